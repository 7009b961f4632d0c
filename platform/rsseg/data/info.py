"""Human-readable summary of a dataset's tile index (``platform data info``): its scenes, the
tiles per split and label-ratio subset, and the class histogram of each split and subset, with a
warning for every class a subset does not have (a 2 % subset of a few images often misses some)."""

from __future__ import annotations

import numpy as np

from rsseg.config.specs import DataSpec
from rsseg.data.tiles import SPLITS, TileIndex

PAPER_SUBSETS = (("S", 0.02), ("M", 0.40), ("L", 1.00))


def subsets_of(data: DataSpec) -> list[tuple[str, float]]:
    """The paper's S / M / L subsets, and the configured label ratio when it is another one."""
    out = list(PAPER_SUBSETS)
    if all(abs(r - data.label_ratio) > 1e-12 for _, r in out):
        out.append((f"{data.label_ratio:g}", data.label_ratio))
    return out


def summary(index: TileIndex, data: DataSpec) -> dict:
    """The numbers `describe` prints, as a dict (tests compare these)."""
    f = index.frame
    subsets = subsets_of(data)
    tiles_per_scene = dict(zip(*np.unique(f["scene"].to_numpy(), return_counts=True))) if f.height else {}
    split_of_scene = {}
    if f.height and index.params.split_by == "scene":
        split_of_scene = {r["scene"]: r["split"] for r in f.select("scene", "split").unique().iter_rows(named=True)}
    out = {
        "dataset": index.scenes.dataset,
        "root": str(index.scenes.root),
        "class_table": index.table.name,
        "labelled_scenes": len(index.scenes.labelled),
        "unlabeled_scenes": len(index.scenes.unlabeled),
        "scenes": [{"id": s.id, "image": str(s.image), "labelled": s.label is not None, "tiles": int(tiles_per_scene.get(s.id, 0)),
                    "split": split_of_scene.get(s.id, "")} for s in index.scenes.scenes],
        "tile_size": index.params.tile_size,
        "stride": index.params.stride,
        "split_by": index.params.split_by,
        "tiles": f.height,
        "splits": {s: int((f["split"] == s).sum()) for s in (*SPLITS, "unlabeled")},
        "subsets": {name: index.subset_size(r) for name, r in subsets},
        "label_ratio": data.label_ratio,
        "label_ratio_tiles": index.subset_size(data.label_ratio),
        "histogram": {s: index.class_histogram(index.split(s)).tolist() for s in SPLITS},
        "subset_histogram": {name: index.class_histogram(index.subset(r)).tolist() for name, r in subsets},
        "leakage": index.leakage(data.label_ratio),
        "absent_classes": index.absent_classes(),
    }
    names = index.table.abbrs
    # the advice follows the split the index has: by tile, only more labels or scenes help
    helps = "a larger label_ratio or more scenes helps" if index.params.split_by == "tile" else \
        "a larger label_ratio, more scenes, or split_by: tile (optimistic scores) helps"
    out["warnings"] = [
        f"label-ratio subset {name} ({index.subset_size(r)} tiles) has no pixel of class {', '.join(missing)}: "
        f"its runs never see them in training ({helps})"
        for name, r in subsets
        if (missing := [names[i] for i, n in enumerate(out["subset_histogram"][name]) if n == 0 and out["histogram"]["train"][i] > 0])
    ] + [f"split {s} has no pixel of class {', '.join(m)}" for s in SPLITS
         if (m := [names[i] for i, n in enumerate(out["histogram"][s]) if n == 0 and sum(out["histogram"][t][i] for t in SPLITS) > 0])]
    if out["absent_classes"]:
        out["warnings"].append(f"class {', '.join(out['absent_classes'])} of class table {index.table.name} has no labelled pixel "
                               "in any split: mIoU leaves it out (every table and run reports the mean over the other classes)")
    return out


def leakage_line(leak: dict[str, int], split_by: str) -> str:
    """One line on how far test tiles sit from training tiles (printed by `data info`, tagged on runs)."""
    if split_by == "scene":
        return f"test tiles touching a training tile: {leak['touch_train']} of {leak['test']} (split by scene)"
    return (f"test tiles touching a training tile: {leak['touch_train']} of {leak['test']}, touching a labelled tile of the "
            f"label-ratio subset: {leak['touch_labelled']} (split by tile: neighbouring tiles share texture, so test scores "
            "are optimistic for a map of new places; data.split_by: scene keeps every image in one split)")


def describe(index: TileIndex, data: DataSpec) -> str:
    s = summary(index, data)
    lines = [
        f"dataset      {s['dataset']}  ({s['root']})",
        f"class table  {s['class_table']} ({index.table.num_classes} classes)",
        f"scenes       {s['labelled_scenes']} labelled, {s['unlabeled_scenes']} unlabelled",
    ]
    for sc in s["scenes"][:50]:
        lines.append(f"  {sc['id']:<40} {'labelled ' if sc['labelled'] else 'unlabeled'} {sc['tiles']:>6} tiles"
                     + (f"  -> {sc['split']}" if sc["split"] else "") + f"  {sc['image']}")
    if len(s["scenes"]) > 50:
        lines.append(f"  ... and {len(s['scenes']) - 50} more scenes")
    lines += [
        f"tiles        {s['tiles']} of {s['tile_size']}x{s['tile_size']} px (stride {s['stride']}), index {index.path}",
        "pixels       sampled windows of every image finite and within "
        + (f"data.value_range {list(index.scenes.value_range)}" if index.scenes.value_range else "the dtype's range")
        + " (checked at index build)",
        f"splits       split by {s['split_by']}: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()),
        f"leakage      {leakage_line(s['leakage'], s['split_by'])}",
        "subsets      " + ", ".join(f"{k} ({r * 100:g} %) {s['subsets'][k]}" for k, r in subsets_of(data))
        + f"; configured label_ratio {s['label_ratio']:g} -> {s['label_ratio_tiles']} tiles",
        "",
        "class histogram (labelled pixels, % per split and label-ratio subset)",
    ]
    names = index.table.abbrs
    columns = [(sp, s["histogram"][sp]) for sp in SPLITS] + [(f"subset {k}", h) for k, h in s["subset_histogram"].items()]
    width = max([len(n) for n in names] + [5])
    lines.append(f"  {'class':<{width}}  " + "  ".join(f"{c:>15}" for c, _ in columns))
    totals = [max(1, sum(h)) for _, h in columns]
    for i, name in enumerate(names):
        cells = [f"{h[i]:>9} {100 * h[i] / t:4.1f}%" for (_, h), t in zip(columns, totals)]
        lines.append(f"  {name:<{width}}  " + "  ".join(cells))
    lines += [f"warning: {w}" for w in s["warnings"]]
    return "\n".join(lines) + "\n"


def histogram_array(index: TileIndex, split: str) -> np.ndarray:
    return index.class_histogram(index.split(split))
