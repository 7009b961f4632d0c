"""The paper's tables and figures as layouts: which runs feed a table, which cell a run fills, and
the rows and columns in the paper's order (class abbreviations as printed in the paper).

A run contributes observations ``(row, column, value)``; observations of the same cell are
aggregated over seeds (mean, sample std, n). Rows and columns the paper has come first, in the
paper's order; rows or columns only we have (a user's method, a timestep set the paper did not
try, a class of the synthetic data) follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from rsseg.runtags import ratio_tag

PAPER12 = ["UB", "Ind.", "PU", "Mine", "AA", "AL", "PC", "Pas.", "For.", "HV", "WL", "Water"]
GID15 = ["IDL", "UR", "RR", "TL", "PF", "IGL", "DC", "GP", "AW", "SL", "NG", "AG", "River", "Lake", "Pond"]
FT = "ft_params_M"
# the paper's label ratios, keyed as the runs' tags spell them: MiniFrance-S, -M, -L
RATIO_S, RATIO_M, RATIO_L = ratio_tag(0.02), ratio_tag(0.4), ratio_tag(1.0)
SIZES = {RATIO_S: "S", RATIO_M: "M", RATIO_L: "L"}
RATIOS = {RATIO_S: "S (2 %)", RATIO_M: "M (40 %)", RATIO_L: "L (100 %)"}
# Table 3's methods in the paper's order; their row labels come from the methods' own metadata
# (`Method.label`), except for the published-only rows of methods that are not installed.
PUBLISHED_ONLY_LABELS = {"ma3e": "MA3E"}
# rows of a method run with public weights (tag weights=public:<name>) instead of pre-trained here
PUBLIC_SUFFIX = "_public"
STRATEGIES = {"imagenet": "ImageNet (ConvNeXt-B, fine-tuned)", "archive_only": "archive only",
              "two_step": "two-step (archive, then homogeneous)", "homogeneous_only": "homogeneous only",
              "imported_two_step": "imported weights (DDPM-CD), then homogeneous",
              "archive_non_homogeneous": "archive, then non-homogeneous (another sensor)"}

Obs = tuple  # (row, column, value) or (row, column, value, key): observations of one key count once
# reference rows (finetune.references, logged by every fine-tuning run): what a cheap per-pixel
# classifier reaches on the same split and labels; a random-weights UNet is the method's own
REFERENCE = "reference"
REFERENCES = {"texture": "Texture classifier (colour + local statistics per pixel)", "colour": "Colour classifier (a pixel's colour alone)"}
RANDOM_SUFFIX = "_random"
# methods whose runs with weights=random are a reference row of their own (a random-init baseline
# such as convnext_random is tagged weights=random too, and is its own method row)
RANDOM_REFERENCES = ("ddpm",)


@dataclass(frozen=True)
class Layout:
    id: str
    title: str
    sweep: str  # the sweep file that fills it
    style: str  # "pairs": an ours row and a paper row per row key; "beside": paper columns beside ours
    observe: Callable[[dict[str, Any]], list[Obs]]
    rows: list[tuple[str, str]]  # (key, label) in the paper's order
    columns: list[tuple[str, str]]
    row_label: Callable[[str], str] = str
    delta: bool = False  # a "Δ mIoU" column (ours - paper)
    split: tuple[str, ...] = ("profile", "dataset")  # runs of different groups are never mixed
    extra_columns: bool = True  # columns only we have (classes) may be appended
    figure: bool = False
    paper_only: tuple[str, ...] = ()  # rows that are the paper's published numbers only (cited SOTA)
    notes: list[str] = field(default_factory=list)
    footer_of_runs: Callable[[list[dict[str, Any]]], list[str]] | None = None  # notes computed from the runs
    paper_dataset: str = "minifrance"  # the paper's numbers stand beside runs of this dataset (or the synthetic stand-in)
    class_columns: bool = False  # columns are the dataset's classes (then they follow the runs' dataset)

    def shows_paper(self, dataset: str | None) -> bool:
        return dataset in (None, "", self.paper_dataset, "synthetic")

    def title_for(self, dataset: str | None) -> str:
        if self.shows_paper(dataset):
            return self.title
        import re

        title = self.title.replace("MiniFrance-S / M / L", f"S / M / L of dataset {dataset}")  # Table 3's ratio names
        return re.sub(r"MiniFrance(-[SML])?|the GID validation set|GID-15", f"dataset {dataset}", title)


def method_label(name: str) -> str:
    from rsseg.methods import registry

    method = registry().get(name)
    if method is None and name.endswith(PUBLIC_SUFFIX) and name[: -len(PUBLIC_SUFFIX)] in registry():
        return f"{registry()[name[: -len(PUBLIC_SUFFIX)]].label} (public weights)"
    return method.label if method is not None else PUBLISHED_ONLY_LABELS.get(name, name)


def _f(x: Any) -> float | None:
    return None if x is None else float(x)


def _classes(run: dict[str, Any], row: str) -> list[Obs]:
    out = [(row, k[len("IoU/"):], v) for k, v in run.items() if k.startswith("IoU/") and v is not None]
    out.append((row, "mIoU", run["mIoU"]))
    return out


def _ft(run: dict[str, Any], row: str) -> list[Obs]:
    p = _f(run.get("trainable_params"))
    return [] if p is None else [(row, FT, p / 1e6)]


def _table1(run):
    res = run["resolutions"]
    col = f"{run['side']}/{'multi' if ',' in res else res}"
    # The paper gives one Ft-Params figure per head: that of the multi-resolution decoder features.
    return [(run["head"], col, run["mIoU"])] + (_ft(run, run["head"]) if col == "decoder/multi" else [])


def _table2(run):
    return _classes(run, run["timesteps"])


def _setting(run) -> str:
    return "frozen" if run["frozen"] == "true" else "finetuned"


def _table3(run):
    weights = str(run.get("weights") or "")
    random = weights == "random" and run["method"] in RANDOM_REFERENCES
    method = run["method"] + (PUBLIC_SUFFIX if weights.startswith("public:") else RANDOM_SUFFIX if random else "")
    row = f"{method}/{_setting(run)}"
    return [(row, run["label_ratio"], run["mIoU"])] + _ft(run, row) + _references(run)


def _references(run) -> list[Obs]:
    """The reference classifiers a run scored on its split and label subset. Every run of one
    (label ratio, seed) scores the same ones, so each counts once (the 4th field)."""
    return [(f"{REFERENCE}/{name}", run["label_ratio"], run[f"ref_{name}"], f"{run['label_ratio']}|{run['seed']}")
            for name in REFERENCES if run.get(f"ref_{name}") is not None]


def _table4(run):
    row = f"{run['method']}/{run['label_ratio']}"
    return _classes(run, row) + _ft(run, row)


def _table5(run):
    return _classes(run, run["method"]) + _ft(run, run["method"])


def strategy(share: str) -> str:
    s = float(share)
    return "archive_only" if s == 0 else "homogeneous_only" if s == 1 else "two_step"


def _fig9(run):
    if run.get("pretrain_init"):
        return [("imported_two_step", "mIoU", run["mIoU"])]
    if run.get("homogeneous_source"):  # step 2 on another dataset's imagery
        return [("archive_non_homogeneous", "mIoU", run["mIoU"])]
    return [(strategy(run["homogeneous_share"]), "mIoU", run["mIoU"])] if run["homogeneous_share"] else []


def _fig10(run):
    return [(run["dataset"], run["homogeneous_share"], run["mIoU"])] if run["homogeneous_share"] else []


# sqrt(abar_t) under the paper's network and schedule (DDPM-CD's SR3, 2 000 steps, 1e-6 -> 1e-2)
PAPER_SQRT_ABAR = "50=0.9969, 100=0.9876, 150=0.9724, 200=0.9513"


def _t2_noise(runs: list[dict[str, Any]]) -> list[str]:
    """What the timesteps meant: sqrt(abar_t) of the runs' schedule beside the paper's."""
    scales: dict[str, str] = {}
    for r in runs:
        for item in filter(None, (r.get("sqrt_abar") or "").split(",")):
            t, _, v = item.partition("=")
            scales.setdefault(t, v)
    if not scales:
        return []
    ours = ", ".join(f"{t}={scales[t]}" for t in sorted(scales, key=int))
    return [f"sqrt(ᾱ_t) per timestep (how much of the image survives): ours {ours}; the paper's schedule "
            f"(DDPM-CD) {PAPER_SQRT_ABAR}. The same t means more noise under a schedule with smaller sqrt(ᾱ_t)."]


def _t2_label(key: str) -> str:
    return f"t = [{', '.join(key.split(','))}]"


def _t3_label(key: str) -> str:
    method, _, setting = key.partition("/")
    if method == REFERENCE:
        return f"reference: {REFERENCES.get(setting, setting)}"
    if method.endswith(RANDOM_SUFFIX) and method[: -len(RANDOM_SUFFIX)] in RANDOM_REFERENCES:
        name = "reference: the same UNet, random weights"
    else:
        name = method_label(method)
    return f"{name} · {'Frozen' if setting == 'frozen' else 'Fine-tuning'}"


def _t4_label(key: str) -> str:
    method, _, ratio = key.partition("/")
    if not ratio:
        return key
    name = method_label(method)
    size = SIZES.get(ratio)
    return f"{name} (MiniFrance-{size})" if size else f"{name} (label ratio {ratio})"


def _res_cols():
    out = []
    for side in ("encoder", "decoder"):
        for r in ("16", "8", "4", "2", "multi"):
            out.append((f"{side}/{r}", f"{side.capitalize()} {'multi-res.' if r == 'multi' else '1/' + r}"))
    return out


def _cls(names):
    return [(c, c) for c in names] + [("mIoU", "mIoU")]


TIMESTEP_ROWS = ["0", "50", "100", "100,50", "200,100,50", "150,100,50"]
# (the paper has no frozen random-init row; ours shows one when the sweep runs it)
T3_METHOD_ROWS = ("convnext_random", "convnext_imagenet", "mae", "mae" + PUBLIC_SUFFIX, "scalemae", "scalemae" + PUBLIC_SUFFIX, "ma3e", "ddpm")
T3_ROWS = [f"{m}/{s}" for m in T3_METHOD_ROWS for s in ("frozen", "finetuned")] + \
    [f"ddpm{RANDOM_SUFFIX}/{s}" for s in ("frozen", "finetuned")] + [f"{REFERENCE}/{name}" for name in REFERENCES]

LAYOUTS: dict[str, Layout] = {
    "table1": Layout("table1", "Table 1. Feature selection: DDPM encoder vs decoder features at each resolution, MLP segmentor vs UPerNet (mIoU %, MiniFrance-S)",
                     "sweeps/feature_selection.yaml", "pairs", _table1,
                     [("mlp", "MLP segmentor"), ("upernet", "UPerNet")], _res_cols() + [(FT, "Ft Params (M)")],
                     extra_columns=False),
    "table2": Layout("table2", "Table 2. Effect of the noise level (timestep sets) on frozen DDPM decoder features: per-class IoU and mIoU (%, MiniFrance-S)",
                     "sweeps/noise_ablation.yaml", "pairs", _table2,
                     [(k, _t2_label(k)) for k in TIMESTEP_ROWS], _cls(PAPER12), row_label=_t2_label, delta=True,
                     footer_of_runs=_t2_noise, class_columns=True),
    "table3": Layout("table3", "Table 3. mIoU (%) by pre-training method, label ratio (MiniFrance-S / M / L) and setting (frozen encoder or full fine-tuning)",
                     "sweeps/label_ratio.yaml", "beside", _table3,
                     [(k, _t3_label(k)) for k in T3_ROWS], [(k, v) for k, v in RATIOS.items()] + [(FT, "Ft Params (M)")],
                     row_label=_t3_label, extra_columns=False,
                     notes=["Rows marked reference are not methods of the paper: the colour and texture classifiers "
                            "(finetune.references) are trained and scored on exactly the runs' label subsets and test splits, "
                            "and the random-weights UNet is ours without its pre-training. If the texture row beats the method, "
                            "the pre-training did not pay off on this data.",
                            "IN-init needs ImageNet ConvNeXt-B weights on local disk (RSSEG_CONVNEXT_WEIGHTS); the small "
                            "and smoke profiles leave it out (there are none for its pico ConvNeXt).",
                            "Ft Params: ours are the trainable parameters of our runs (smoke: pico/tiny networks); "
                            "the paper's differ by architecture size, heads and neck (see docs/benchmarks.md)."]),
    "table4": Layout("table4", "Table 4. Per-class IoU (%) on MiniFrance: ours beside the published state of the art",
                     "sweeps/sota_minifrance.yaml", "pairs", _table4,
                     [(k, k) for k in ("SETR", "SegFormer-B4", "PFNet", "MCS", "ConvNeXt-B", "LSKNet-T-FPN")]
                     + [(f"segformer/{RATIO_S}", "SegFormer-B4, run here (MiniFrance-S)"), (f"segformer/{RATIO_L}", "SegFormer-B4, run here (MiniFrance-L)")]
                     + [(f"ddpm/{RATIO_S}", "ours (MiniFrance-S)"), (f"ddpm/{RATIO_L}", "ours (MiniFrance-L)")],
                     _cls(PAPER12) + [(FT, "Ft Params (M)")], row_label=_t4_label, delta=True, class_columns=True,
                     paper_only=("SETR", "SegFormer-B4", "PFNet", "MCS", "ConvNeXt-B", "LSKNet-T-FPN"),
                     notes=["SOTA rows are the paper's published numbers; \"SegFormer-B4, run here\" is method segformer "
                            "(MiT-B4 + all-MLP decoder, fully fine-tuned by this sweep; smoke: a pico MiT)."]),
    "table5": Layout("table5", "Table 5. Per-class IoU (%) on the GID validation set: ours beside the published state of the art",
                     "sweeps/sota_gid.yaml", "pairs", _table5,
                     [(k, k) for k in ("SETR-M", "SegFormer-B4", "PFNet", "MCS", "MA3E", "ConvNeXt-B", "LSKNet-T-FPN")]
                     + [("segformer", "SegFormer-B4, run here"), ("ddpm", "ours")],
                     _cls(GID15) + [(FT, "Ft Params (M)")], row_label=method_label, delta=True, class_columns=True,
                     paper_dataset="gid",
                     paper_only=("SETR-M", "SegFormer-B4", "PFNet", "MCS", "MA3E", "ConvNeXt-B", "LSKNet-T-FPN"),
                     notes=["SOTA rows are the paper's published numbers; \"SegFormer-B4, run here\" is method segformer "
                            "(MiT-B4 + all-MLP decoder, fully fine-tuned by this sweep; smoke: a pico MiT)."]),
    "fig9": Layout("fig9", "Figure 9. Pre-training strategies: mIoU (%) at 2 % labels", "sweeps/pretrain_strategy.yaml", "beside",
                   _fig9, list(STRATEGIES.items()), [("mIoU", "mIoU")], row_label=lambda k: STRATEGIES.get(k, k),
                   extra_columns=False, figure=True),
    "fig10": Layout("fig10", "Figure 10. mIoU (%) vs the share of homogeneous pre-training iterations", "sweeps/homogeneous_ratio.yaml",
                    "beside", _fig10, [], [], split=("profile",), figure=True),
}
TABLES = [k for k, v in LAYOUTS.items() if not v.figure]
FIGURES = [k for k, v in LAYOUTS.items() if v.figure]
