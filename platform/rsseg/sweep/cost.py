"""The bill before the sweep: estimated device-hours per stage (``platform sweep X --dry-run``).

Work per stage comes from the plan (iterations x batch, tiles x timesteps, trials), FLOPs per
unit of work from the runs' own networks (`rsseg.flops`, counted on the meta device), and the
rate from a rates file that ``bench/gpu_check.py --rates FILE`` writes on the user's GPU (the
FLOP/s each stage reached there) — or, until one is given, an assumed GPU and utilisation, and
the output says which. Multi-worker pre-training and fractional GPUs per trial change the wall
clock, not the device-hours.

Tile counts come from the tile index when it is built; else from the scenes' sizes (raster
headers, an upper bound: the index drops tiles with too few valid pixels); else, for the
paper's datasets, from the paper's description of them. Feature passes use the exact count of
`rsseg.sweep.passes` when the index exists (the cache shares passes across trials), else the
count without sharing (an upper bound).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsseg.errors import ConfigError
from rsseg.flops import STAGES

# Until a rates file is given: a GPU of this bf16 matmul peak, at this share of it.
ASSUMED_PEAK_TFLOPS = 400.0  # between an A100 (312) and an H100 (~790 measured here by bench/gpu_check.py)
ASSUMED_UTILISATION = 0.3
RATES_KIND = "rsseg-rates"
STAGE_NAMES = {"pretrain": "pre-training", "extraction": "feature extraction", "finetune": "fine-tuning", "evaluation": "evaluation"}
# The paper's datasets as it describes them (4.1): used for tile counts when the data is not here.
NOMINAL = {
    "minifrance": (388, 10_000, 10_000, "the paper's MiniFrance: 388 labelled scenes of 10 000 x 10 000 px"),
    "gid": (10, 7_200, 6_800, "the paper's GID-15 fine set: 10 labelled scenes of 7 200 x 6 800 px"),
}


@dataclass(frozen=True)
class Rates:
    """FLOP/s each stage reaches, and where the figures come from."""

    flops_per_s: dict[str, float]
    source: str

    @classmethod
    def assumed(cls) -> "Rates":
        rate = ASSUMED_PEAK_TFLOPS * 1e12 * ASSUMED_UTILISATION
        return cls({s: rate for s in STAGES}, f"FLOP counts at {ASSUMED_UTILISATION:.0%} of an assumed {ASSUMED_PEAK_TFLOPS:g} TFLOP/s "
                                              "bf16 GPU (no --rates file; measure yours with bench/gpu_check.py --rates FILE)")

    @classmethod
    def load(cls, path: Path) -> "Rates":
        """A rates file of bench/gpu_check.py; stages it lacks keep the assumed rate (said so)."""
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the rates file ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not a rates file (invalid JSON at line {exc.lineno}); expected what "
                              "bench/gpu_check.py --rates FILE writes") from None
        if not isinstance(doc, dict) or doc.get("kind") != RATES_KIND or not isinstance(doc.get("stages"), dict):
            raise ConfigError(f"{path}: not a rates file (expected kind: {RATES_KIND} and stages, as bench/gpu_check.py --rates writes)")
        assumed, rates, missing = cls.assumed(), {}, []
        for stage in STAGES:
            tflops = (doc["stages"].get(stage) or {}).get("tflops")
            if tflops is None:
                missing.append(stage)
                rates[stage] = assumed.flops_per_s[stage]
            elif not isinstance(tflops, (int, float)) or not tflops > 0:
                raise ConfigError(f"{path}: stages.{stage}.tflops: expected a positive number, got {tflops!r}")
            else:
                rates[stage] = float(tflops) * 1e12
        source = f"rates measured on {doc.get('device', '?')} ({doc.get('date', '?')}, {path})"
        if missing:
            source += f"; {', '.join(missing)} not measured there: assumed rate"
        return cls(rates, source)


@dataclass(frozen=True)
class Tiles:
    train: int
    val: int
    test: int
    source: str


@dataclass
class StageWork:
    units: float = 0.0  # images, passes, samples or tiles
    flops: float = 0.0
    notes: list[str] = field(default_factory=list)


def _shares(total: int, split: tuple[float, float, float]) -> tuple[int, int, int]:
    train, val = round(total * split[0]), round(total * split[1])
    return train, val, max(0, total - train - val)


def _windows(width: int, height: int, spec) -> int:
    stride = spec.stride or spec.tile_size
    if width < spec.tile_size or height < spec.tile_size:
        return 0
    return ((width - spec.tile_size) // stride + 1) * ((height - spec.tile_size) // stride + 1)


def tile_counts(spec, workdir) -> Tiles | None:
    """Train / val / test tiles of a run's data (see the module docstring for the sources)."""
    from rsseg.sweep.passes import cached_index

    index = cached_index(spec, workdir)
    if index is not None:
        return Tiles(*(index.split(s).height for s in ("train", "val", "test")), "the tile index")
    if spec.dataset == "synthetic":
        s = spec.synthetic
        return Tiles(*_shares(s.scenes * _windows(s.size, s.size, spec), spec.split), "the synthetic dataset's spec")
    sizes = _scene_sizes(spec, workdir)
    if sizes is not None:
        total = sum(_windows(w, h, spec) for w, h in sizes)
        return Tiles(*_shares(total, spec.split), f"the sizes of {len(sizes)} labelled scenes (an upper bound: before the index's checks)")
    if spec.dataset in NOMINAL:
        n, w, h, what = NOMINAL[spec.dataset]
        return Tiles(*_shares(n * _windows(w, h, spec), spec.split), f"{what} (data.root not found here)")
    return None


def _scene_sizes(spec, workdir) -> list[tuple[int, int]] | None:
    """(width, height) of the labelled scenes from their headers, or None when the data is not here."""
    if spec.root is None or not Path(spec.root).is_dir():
        return None
    import rasterio

    from rsseg.data import registry
    from rsseg.errors import RssegError

    try:
        scenes = registry.scenes(spec, workdir)
    except RssegError:
        return None
    sizes = []
    for scene in scenes.labelled:
        with rasterio.open(scene.image) as src:
            sizes.append((src.width, src.height))
    return sizes


def _evaluations(ft) -> int:
    return ft.iterations // ft.eval_every + (1 if ft.iterations % ft.eval_every else 0)


def _parts(run) -> int:
    return len(run.ddpm.features.timesteps) if run.method == "ddpm" else 1


class _Flops:
    """FLOPs per unit, counted once per distinct network (a pre-training once per fingerprint) in
    this process: a count is a pure function of its key."""

    seen: dict[str, Any] = {}

    def of(self, res):
        """The FLOPs of a resolved run's networks."""
        from rsseg.flops import unit_flops
        from rsseg.provenance import fingerprint
        from rsseg.sweep.plan import _classes, plan_bands

        run = res.spec
        d = run.model_dump(mode="json")
        key = fingerprint({k: d.get(k) for k in ("method", run.plugin.block or "method", "finetune")}
                          | {"tile": run.data.tile_size, "bands": plan_bands(run.data)})
        if key not in self.seen:
            self.seen[key] = unit_flops(run, plan_bands(run.data), _classes(run.data) or 10, res.head)
        return self.seen[key]

    def pretrain(self, run) -> float | None:
        """None when the objective cannot be built here (ScaleMAE reads the imagery's GSD)."""
        from rsseg.errors import RssegError
        from rsseg.flops import pretrain_flops
        from rsseg.sweep.plan import plan_bands

        key = f"pretrain:{run.pretrain_fingerprint}"
        if key not in self.seen:
            try:
                self.seen[key] = pretrain_flops(run, plan_bands(run.data)) or 0.0
            except RssegError:
                self.seen[key] = None
        return self.seen[key]


def stage_work(plan, workdir) -> tuple[dict[str, StageWork], list[str]]:
    """The sweep's work and FLOPs per stage, and notes on where counts come from."""
    from rsseg.sweep import passes
    from rsseg.sweep.plan import pretraining_work

    work = {s: StageWork() for s in STAGES}
    flops, notes = _Flops(), []
    for spec, iterations in pretraining_work(plan, workdir):
        images = iterations * spec.pretrain.batch_size
        per_image = flops.pretrain(spec)
        if per_image is None:
            notes.append(f"the {spec.method} pre-training ({images:,} images) not counted: its network needs the data to be built")
            continue
        work["pretrain"].units += images
        work["pretrain"].flops += images * per_image
    counted = passes.count(plan, workdir)
    samples = plan.spec.search.num_samples
    unknown_tiles, counted_ddpm = set(), 0
    for trial in plan.trials:
        run = trial.spec
        unit = flops.of(trial.resolved)
        ft = run.finetune
        reads = ft.iterations * ft.batch_size
        work["finetune"].units += samples * reads
        work["finetune"].flops += samples * reads * unit.finetune
        tiles = tile_counts(run.data, workdir)
        if tiles is None:
            unknown_tiles.add(run.data.dataset)
            continue
        if tiles.source not in notes:
            notes.append(tiles.source)
        val = min(tiles.val, ft.val_max_tiles or tiles.val)
        evaluated = _evaluations(ft) * val + tiles.test
        work["evaluation"].units += samples * evaluated
        work["evaluation"].flops += samples * evaluated * unit.evaluation
        if not ft.frozen:
            continue
        if counted is not None and passes._counted(run):
            counted_ddpm += 1
            work["extraction"].flops += unit.extraction * counted.planned / max(counted.trials, 1)
            continue
        n = samples * (reads + evaluated) * _parts(run)
        work["extraction"].units += n
        work["extraction"].flops += n * unit.extraction
    if counted is not None and counted_ddpm:
        work["extraction"].units += counted.planned
        notes.append(f"feature passes: {counted.planned:,} with the shared cache (vs {counted.naive:,} without)")
    elif any(t for t in plan.trials if t.spec.finetune.frozen):
        notes.append("feature passes: without cache sharing (an upper bound; counted exactly once the tile index exists)")
    if unknown_tiles:
        notes.append(f"extraction and evaluation of {', '.join(sorted(unknown_tiles))} not counted: tile count unknown until "
                     "the data is there (`platform data info`)")
    return work, notes


def _fmt_units(n: float) -> str:
    return f"{n:,.0f}" if n < 1e6 else f"{n / 1e6:,.2f} M"


def describe(plan, workdir, rates: Rates) -> str:
    """The dry run's device-hours block."""
    work, notes = stage_work(plan, workdir)
    units = {"pretrain": "images", "extraction": "(tile, timestep) passes", "finetune": "training samples", "evaluation": "tiles"}
    lines = [f"device-hours (estimate; {rates.source}):"]
    total = 0.0
    for stage in STAGES:
        w = work[stage]
        hours = w.flops / rates.flops_per_s[stage] / 3600.0
        total += hours
        per = f"{w.flops / w.units / 1e12:.3f} TFLOP each" if w.units else "-"
        lines.append(f"  {STAGE_NAMES[stage]:<19} {_fmt_units(w.units):>12} {units[stage]:<24} {per:<20} {hours:10.2f} h")
    lines.append(f"  {'total':<19} {'':>12} {'':<24} {'':<20} {total:10.2f} h"
                 + (f"  (~{total / 24:.1f} GPU-days)" if total >= 24 else ""))
    lines += [f"  ({n})" for n in notes]
    return "\n".join(lines) + "\n"


def load_rates(path: Path | None) -> Rates:
    return Rates.load(path) if path is not None else Rates.assumed()
