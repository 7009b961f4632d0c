"""Typed, strict, frozen specs: the only shape in which configuration enters the platform.

Defaults live here, once. Every model forbids unknown keys (a typo is an error with the closest
valid key, not a silently ignored setting) and is frozen (a spec is a value: hashing it gives the
fingerprints of pre-trainings and cached features).

This module is the config edge: it knows no method plugin. A run spec (one pre-training +
fine-tuning = one sweep trial) is `RunSpecBase` plus one block per installed method (``ddpm:``,
``mae:``, ...), assembled by `rsseg.runspec` from the method registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# A path in a spec is made absolute where the spec is first read (the user's working directory):
# Ray workers run elsewhere, and the fingerprint of `root: data` must not depend on where it runs.
AbsPath = Annotated[Path, AfterValidator(lambda p: p.expanduser().absolute())]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


# ----------------------------------------------------------------------------------------------
# Data


class SyntheticSpec(Strict):
    """The built-in procedural dataset (rsseg.data.synthetic)."""

    scenes: int = Field(10, ge=1, description="labelled scenes")
    size: int = Field(512, ge=16, description="scene side in pixels")
    unlabeled_scenes: int = Field(4, ge=0, description="extra unlabelled scenes of the same domain")
    archive_scenes: int = Field(4, ge=0, description="scenes of a shifted 'archive' domain for step-1 pre-training")
    seed: int = 0
    gsd: float = Field(0.5, gt=0, description="ground sample distance in metres")
    texture_scale: float = Field(1.0, gt=0, description="multiplies every pattern's size and the region size")


class GidSpec(Strict):
    level: Literal["fine", "coarse"] = Field("fine", description="fine = GID-15 (10 images), coarse = GID-5 (150 images)")
    image: Literal["rgb", "nirrgb"] = "rgb"


def label_ratio_problem(ratio: object) -> str | None:
    """The one rule for a label ratio (the share of training tiles with labels): a number in
    (0, 1]. None when it holds, else what is wrong and what to write instead."""
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0.0 < ratio <= 1.0:
        return None
    return f"label ratio {ratio!r} is outside (0, 1]; use e.g. 0.02 (S), 0.4 (M) or 1.0 (L)"


def _label_ratio(ratio: float) -> float:
    if problem := label_ratio_problem(ratio):
        raise ValueError(problem)
    return ratio


LabelRatio = Annotated[float, AfterValidator(_label_ratio)]


class DataSpec(Strict):
    dataset: str = Field("synthetic", description="a registered dataset (rsseg.data.datasets): synthetic, minifrance, gid, folder "
                                                    "or one an installed package adds")
    root: AbsPath | None = Field(None, description="dataset root (synthetic: where to generate; default under the workdir)")
    class_table: str | None = Field(None, description="named table or a YAML path; default per dataset")
    bands: list[int] | None = Field(None, description="1-based bands to read, e.g. [2, 3, 4] for RGB out of NIR-RGB")
    value_range: tuple[float, float] | None = Field(None, description="raw range mapped to [-1, 1]; default from dtype")
    tile_size: int = Field(256, ge=8)
    stride: int | None = Field(None, ge=1, description="window step; default = tile_size (no overlap)")
    min_valid_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="skip windows with this share of valid pixels or less")
    split_seed: int = 0
    split: tuple[float, float, float] = Field((0.4, 0.1, 0.5), description="train/val/test shares of tiles")
    split_by: Literal["auto", "tile", "scene"] = Field(
        "auto", description="tile: tiles shuffled across all scenes (the paper's random split); scene: every image wholly in one "
                            "split, so neighbouring tiles never sit in train and test (what a map of new places needs); auto: "
                            "scene for a folder dataset of at least 3 labelled scenes, else tile (the paper's datasets)")
    label_ratio: LabelRatio = Field(0.02, description="share of training tiles with labels (S=0.02, M=0.4, L=1.0)")
    synthetic: SyntheticSpec = SyntheticSpec()
    gid: GidSpec = GidSpec()

    @property
    def declared_bands(self) -> int | None:
        """The input bands, known without reading a raster: ``bands`` if set, NIR-RGB GID 4, RGB GID,
        MiniFrance and synthetic 3; None for a folder dataset (its rasters say). The one place of this rule."""
        if self.bands:
            return len(self.bands)
        if self.dataset == "gid":
            return 4 if self.gid.image == "nirrgb" else 3
        return {"synthetic": 3, "minifrance": 3}.get(self.dataset)

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x < 0 for x in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"expected three non-negative shares summing to 1, got {list(v)}")
        return v

    @field_validator("bands")
    @classmethod
    def _bands_positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(b < 1 for b in v)):
            raise ValueError("expected a non-empty list of 1-based band numbers")
        return v

    @property
    def tile_split_by_default(self) -> bool:
        """True when the split is the paper's by-tile one by default (``tile``, or ``auto`` on a
        dataset other than ``folder``): left out of identities, so their keys stay as they were."""
        return self.split_by == "tile" or (self.split_by == "auto" and self.dataset != "folder")

    def identity(self) -> dict[str, Any]:
        """What determines the imagery and tiles (not the label ratio): for fingerprints."""
        d = self.model_dump(mode="json", exclude={"label_ratio"} | ({"split_by"} if self.tile_split_by_default else set()))
        if self.dataset != "synthetic":
            d.pop("synthetic")
        if self.dataset != "gid":
            d.pop("gid")
        return d


class ArchiveSpec(Strict):
    """Archive imagery for step-1 pre-training: any folder of GeoTIFFs, unlabelled."""

    source: Literal["auto", "synthetic", "folder", "none"] = Field(
        "auto", description="auto = the synthetic archive domain for synthetic data, else the folder at root"
    )
    root: AbsPath | None = None
    glob: str = "**/*.tif"
    bands: list[int] | None = None
    value_range: tuple[float, float] | None = None

    def source_for(self, data: DataSpec) -> Literal["synthetic", "folder", "none"]:
        """Where the archive imagery comes from for this dataset, ``auto`` resolved: the synthetic
        archive domain for synthetic data, else the folder at ``root``, else none. The one place of
        this rule (the fingerprint, the data checks, the node checks and the reader use it)."""
        if self.source != "auto":
            return self.source
        return "synthetic" if data.dataset == "synthetic" else ("folder" if self.root else "none")


# ----------------------------------------------------------------------------------------------
# Pre-training (shared by every objective; the objective's own network/optimiser live in its
# method block)


class IterationsSpec(Strict):
    """Two-step schedule: archive iterations, then homogeneous ones.

    Either ``archive`` + ``homogeneous`` or ``total`` + ``homogeneous_ratio`` (Fig. 10 sweeps the
    ratio). Both spellings of the same schedule give the same fingerprint.
    """

    archive: int | None = Field(None, ge=0)
    homogeneous: int | None = Field(None, ge=0)
    total: int | None = Field(None, ge=1)
    homogeneous_ratio: float | None = None

    @model_validator(mode="after")
    def _one_spelling(self) -> "IterationsSpec":
        counts = self.archive is not None or self.homogeneous is not None
        ratio = self.total is not None or self.homogeneous_ratio is not None
        if self.homogeneous_ratio is not None and not 0.0 <= self.homogeneous_ratio <= 1.0:
            raise ValueError(f"homogeneous_ratio must be within [0, 1], got {self.homogeneous_ratio}")
        if counts and ratio:
            raise ValueError("give either archive + homogeneous or total + homogeneous_ratio, not both")
        if ratio and (self.total is None or self.homogeneous_ratio is None):
            raise ValueError("total and homogeneous_ratio go together")
        if not counts and not ratio:
            raise ValueError("give archive + homogeneous or total + homogeneous_ratio")
        if self.counts()[0] + self.counts()[1] < 1:
            raise ValueError("at least one pre-training iteration is needed")
        return self

    def counts(self) -> tuple[int, int]:
        """(archive, homogeneous) iteration counts."""
        if self.total is not None and self.homogeneous_ratio is not None:
            homogeneous = round(self.total * self.homogeneous_ratio)
            return self.total - homogeneous, homogeneous
        return self.archive or 0, self.homogeneous or 0

    @property
    def n_total(self) -> int:
        a, h = self.counts()
        return a + h

    @property
    def homogeneous_share(self) -> float:
        """Share of the iterations spent on homogeneous imagery (Fig. 9 / 10's axis): the ratio as
        the user wrote it when they wrote one (the counts are rounded from it), else from the counts."""
        if self.homogeneous_ratio is not None:
            return self.homogeneous_ratio
        return self.counts()[1] / self.n_total


class OptimSpec(Strict):
    """AdamW with a linear warm-up from ``warmup_start_lr`` to ``lr``, then constant or cosine."""

    lr: float = Field(1e-5, gt=0)
    warmup_start_lr: float = Field(1e-6, ge=0)
    warmup_iterations: int = Field(10_000, ge=0)
    after_warmup: Literal["constant", "cosine"] = "constant"
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)


class EmaSpec(Strict):
    enabled: bool = True
    decay: float = Field(0.9999, gt=0, lt=1)


class PretrainRuntimeSpec(Strict):
    """How a pre-training runs on Ray Train (not what it learns): excluded from its fingerprint.
    The device comes from the run's `RuntimeSpec` (``runtime.device``)."""

    workers: int = Field(1, ge=1, description="Ray Train workers (DDP); 1 with no cluster address runs in Ray Train's "
                                                "local mode, in the command's own process (docs/sweeps.md)")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs each Train worker reserves; default: the cluster's CPUs shared by the pre-trainings "
                                "that run at once, at most one node's")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs each worker reserves; default 1 when the device is CUDA, else 0")
    placement: Literal["PACK", "SPREAD"] = Field("PACK", description="Ray placement strategy of the worker group")
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(50, ge=1)
    max_failures: int = Field(3, ge=0, description="worker-group restarts from the last checkpoint (worker actors; "
                                                          "in local mode, re-running the command resumes)")
    controller_failure_limit: int = Field(3, ge=0, description="bound on retries when resources are lost")
    samples: int = Field(4, ge=0, description="denoised samples in the artifact grid")
    sample_steps: int = Field(50, ge=1, description="reverse steps for the sample grid (DDIM-free, strided DDPM)")


class PretrainSpec(Strict):
    iterations: IterationsSpec = IterationsSpec(archive=180_000, homogeneous=20_000)
    batch_size: int = Field(8, ge=1, description="global batch (split across workers)")
    seed: int = 0
    ema: EmaSpec = EmaSpec()
    archive: ArchiveSpec = ArchiveSpec()
    homogeneous: list[Literal["unlabeled", "train"]] = Field(
        ["unlabeled", "train"], description="target-dataset tiles used (images only) in step 2"
    )
    homogeneous_data: DataSpec | None = Field(
        None, description="step 2 on another dataset's imagery instead of the target's own (Fig. 9's archive + non-homogeneous); "
                          "its pretrain.homogeneous splits are used")
    init: str | None = Field(None, description="start from imported weights of this name (`platform weights list`), e.g. "
                                               "DDPM-CD's model pre-trained on Google Earth imagery, instead of the seeded init")
    runtime: PretrainRuntimeSpec = PretrainRuntimeSpec()


# ----------------------------------------------------------------------------------------------
# Fine-tuning


class MlpHeadSpec(Strict):
    # The paper's "3 c_i -> c_i" is ambiguous: "map" = one block per feature map over the
    # timesteps (3 timesteps x c_i); "resolution" = one block per resolution over all maps and
    # timesteps. Report the trainable-parameter count either way.
    grouping: Literal["map", "resolution"] = "map"
    fuse_stride: int = Field(4, description="resolution at which maps are fused (the paper: 1/4)")
    fuse_hidden: int | None = Field(
        None, ge=1, description="width of the final (fusion) block: the concatenation is first projected to it (1x1); "
                                "None = a block on the full concatenation")


class UperNetHeadSpec(Strict):
    channels: int = Field(512, ge=8)
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    auxiliary: bool = Field(False, description="FCN auxiliary head on the third map (loss weight 0.4)")


class SegformerHeadSpec(Strict):
    """SegFormer's all-MLP decoder (rsseg.heads.segformer); B4 uses 768 channels."""

    decoder_hidden_size: int = Field(768, ge=8)
    dropout: float = Field(0.1, ge=0, lt=1)


class AugmentSpec(Strict):
    """The paper's augmentation: random linear stretch (5-15 % cut), rot90 k in {1,2,3}, flips."""

    stretch: bool = True
    stretch_cut: tuple[float, float] = (0.05, 0.15)
    rot90: bool = True
    flip: bool = True
    p: float = Field(0.5, ge=0, le=1, description="probability of each transform")


class CacheSpec(Strict):
    enabled: bool = True
    budget_gb: float = Field(20.0, ge=0)


class FinetuneSpec(Strict):
    head: str = Field("auto", description="a registered head (built in: mlp, upernet, segformer; a package adds its own through "
                                          "the rsseg.heads entry points); auto: the method's default for frozen / fine-tuned")
    mlp: MlpHeadSpec = MlpHeadSpec()
    upernet: UperNetHeadSpec = UperNetHeadSpec()
    segformer: SegformerHeadSpec = SegformerHeadSpec()
    frozen: bool = True
    iterations: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_iterations: int = Field(0, ge=0)
    eval_every: int = Field(100, ge=1, description="validation (and a checkpoint) every N iterations")
    eval_batch_size: int = Field(16, ge=1)
    val_max_tiles: int | None = Field(None, ge=1, description="cap on val tiles per evaluation (test is always whole)")
    augment: AugmentSpec = AugmentSpec()
    cache: CacheSpec = CacheSpec()
    log_predictions: int = Field(4, ge=0, description="prediction overlays logged as artifacts")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: the trial's CPUs")
    references: list[Literal["colour", "texture"]] = Field(
        ["texture"], description="reference classifiers trained and scored on exactly this run's label subset and test split "
                                 "(rsseg.data.pixel_baselines; logged as reference/<name>/mIoU): colour = a pixel's colour "
                                 "alone, texture = colour + local statistics; [] for none")


class RuntimeSpec(Strict):
    """Where and how a run computes, for every stage (pre-training, fine-tuning, evaluation,
    feature extraction, viz, prediction): excluded from fingerprints and trial keys.

    ``auto``: the GPU Ray grants the process (a sweep trial's or a Train worker's share), else a
    local CUDA device, else the CPU. ``cuda`` without one is an error, never a silent CPU run."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes reading tiles ahead")
    cpu_kernels: Literal["native", "avx2"] = Field(
        "native", description="CPU code path of pre-training and fine-tuning: native = the CPU's best (AVX-512 where it has "
                              "it); avx2 = the AVX2 code on every x86 CPU, so that machines with and without AVX-512 compute "
                              "the same numbers (rsseg.kernels; the smoke profile sets it)")


class TrackingSpec(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite under the workdir")
    experiment: str | None = None


# ----------------------------------------------------------------------------------------------
# One run = one trial


class RunSpecBase(Strict):
    """One run without its method blocks: `rsseg.runspec` assembles the full RunSpec from the
    installed methods (one block per method spec) above this module, so config knows no plugin."""

    name: str = "run"
    seed: int = Field(0, description="fine-tuning seed (pre-training has its own: pretrain.seed)")
    data: DataSpec = DataSpec()
    method: str = "ddpm"
    pretrain: PretrainSpec = PretrainSpec()
    finetune: FinetuneSpec = FinetuneSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    tracking: TrackingSpec = TrackingSpec()


# ----------------------------------------------------------------------------------------------
# Sweeps


AXIS_KINDS = ("grid", "cases", "choice", "uniform", "loguniform", "int")
_AXIS_ATTR = {"int": "integer"}


class Axis(Strict):
    """One dimension of a sweep's search space: exactly one of the keys.

    ``grid`` values go to the axis' dotted key; ``cases`` are named sets of dotted keys and values
    that change together (the axis' key is then a label, e.g. ``strategy``)::

        strategy:
          cases:
            - {name: two-step, pretrain.iterations.homogeneous_ratio: 0.1}
            - {name: imported + homogeneous, pretrain.init: ddpm_cd, pretrain.iterations: {archive: 0, homogeneous: 20000}}
    """

    grid: list[Any] | None = None
    cases: list[dict[str, Any]] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = Field(None, alias="int")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data: Any) -> Any:
        if not isinstance(data, (dict, Axis)):
            raise ValueError(f"expected an axis such as {{grid: [...]}} (one of {', '.join(AXIS_KINDS)}), got "
                             f"{type(data).__name__} {data!r}"[:300])
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> "Axis":
        given = [k for k in AXIS_KINDS if getattr(self, _AXIS_ATTR.get(k, k)) is not None]
        if len(given) != 1:
            raise ValueError("expected exactly one of grid, cases, choice, uniform, loguniform, int")
        kind = given[0]
        if kind in ("grid", "cases", "choice") and not getattr(self, kind):
            raise ValueError(f"{kind} is empty: list at least one value")
        if kind == "cases":
            for i, case in enumerate(self.cases):
                if not any(k != "name" for k in case):
                    raise ValueError(f"cases[{i}]: expected dotted keys and their values, e.g. {{name: two-step, pretrain.init: x}}")
        if kind in ("uniform", "loguniform", "int"):
            lo, hi = getattr(self, _AXIS_ATTR.get(kind, kind))
            if not lo < hi:
                raise ValueError(f"{kind} expects [low, high] with low < high, got [{lo}, {hi}]")
            if kind == "loguniform" and lo <= 0:
                raise ValueError("loguniform needs a positive low bound")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in AXIS_KINDS if getattr(self, _AXIS_ATTR.get(k, k)) is not None)

    @property
    def bounds(self) -> tuple[float, float] | None:
        return getattr(self, _AXIS_ATTR.get(self.kind, self.kind)) if self.kind not in ("grid", "cases", "choice") else None

    @property
    def planned(self) -> bool:
        """Expanded by the plan (grid, cases), not searched by Optuna."""
        return self.kind in ("grid", "cases")

    def cells(self, key: str) -> list[tuple[Any, dict[str, Any]]]:
        """(the value shown for the axis, the dotted keys it sets) per planned value."""
        if self.kind == "grid":
            return [(v, {key: v}) for v in self.grid]
        return [(c.get("name", f"case {i}"), {k: v for k, v in c.items() if k != "name"}) for i, c in enumerate(self.cases)]


class AshaSpec(Strict):
    grace_period: int = Field(1, ge=1, description="evaluations before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class ResourcesSpec(Strict):
    cpu: float = Field(1.0, ge=0)
    gpu: float = Field(0.0, ge=0)


class SearchSpec(Strict):
    algorithm: Literal["grid", "optuna"] = "grid"
    num_samples: int = Field(1, description="optuna: trials per grid cell; grid: repeats of the grid")
    sampler_seed: int = 0
    metric: str = "val/mIoU"
    mode: Literal["max", "min"] = "max"
    asha: AshaSpec | None = None
    max_concurrent: int | None = Field(None, ge=1)
    resources: ResourcesSpec = ResourcesSpec()
    trial_retries: int = Field(1, ge=0, description="re-runs of a failed trial (Tune FailureConfig)")

    @model_validator(mode="after")
    def _samples(self) -> "SearchSpec":
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 with {self.algorithm}, got {self.num_samples}")
        return self


# The paper's tables and figures the platform builds (rsseg.tables.layouts has one layout each)
PAPER_TABLES = ("table1", "table2", "table3", "table4", "table5", "fig9", "fig10")


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    table: str | None = Field(None, description="which paper table/figure the runs fill (tag table=...); none for a search")
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict, description="one trial's spec (validated as a RunSpec)")
    space: dict[str, Axis] = Field(default_factory=dict)
    search: SearchSpec = SearchSpec()

    @field_validator("table")
    @classmethod
    def _known_table(cls, v: str | None) -> str | None:
        if v is not None and v not in PAPER_TABLES:
            import difflib

            close = difflib.get_close_matches(v, PAPER_TABLES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown table {v!r}: expected one of {', '.join(PAPER_TABLES)} (or no table){hint}")
        return v
