"""Human-readable summary of a dataset's tile index (``platform data info``)."""

from __future__ import annotations

import numpy as np

from rsseg.config.specs import DataSpec
from rsseg.data.tiles import SPLITS, TileIndex

PAPER_SUBSETS = (("S", 0.02), ("M", 0.40), ("L", 1.00))


def summary(index: TileIndex, data: DataSpec) -> dict:
    """The numbers `describe` prints, as a dict (tests compare these)."""
    f = index.frame
    out = {
        "dataset": index.scenes.dataset,
        "root": str(index.scenes.root),
        "class_table": index.table.name,
        "labelled_scenes": len(index.scenes.labelled),
        "unlabeled_scenes": len(index.scenes.unlabeled),
        "tile_size": index.params.tile_size,
        "stride": index.params.stride,
        "tiles": f.height,
        "splits": {s: int((f["split"] == s).sum()) for s in (*SPLITS, "unlabeled")},
        "subsets": {name: index.subset_size(r) for name, r in PAPER_SUBSETS},
        "label_ratio": data.label_ratio,
        "label_ratio_tiles": index.subset_size(data.label_ratio),
        "histogram": {s: index.class_histogram(index.split(s)).tolist() for s in SPLITS},
    }
    return out


def describe(index: TileIndex, data: DataSpec) -> str:
    s = summary(index, data)
    lines = [
        f"dataset      {s['dataset']}  ({s['root']})",
        f"class table  {s['class_table']} ({index.table.num_classes} classes)",
        f"scenes       {s['labelled_scenes']} labelled, {s['unlabeled_scenes']} unlabelled",
        f"tiles        {s['tiles']} of {s['tile_size']}x{s['tile_size']} px (stride {s['stride']}), index {index.path}",
        "splits       " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()),
        "subsets      " + ", ".join(f"{k} ({int(r * 100)} %) {s['subsets'][k]}" for k, r in PAPER_SUBSETS)
        + f"; configured label_ratio {s['label_ratio']:g} -> {s['label_ratio_tiles']} tiles",
        "",
        "class histogram (labelled pixels, % per split)",
    ]
    names = index.table.abbrs
    width = max([len(n) for n in names] + [5])
    lines.append(f"  {'class':<{width}}  " + "  ".join(f"{sp:>15}" for sp in SPLITS))
    totals = {sp: max(1, sum(s["histogram"][sp])) for sp in SPLITS}
    for i, name in enumerate(names):
        cells = [f"{s['histogram'][sp][i]:>9} {100 * s['histogram'][sp][i] / totals[sp]:4.1f}%" for sp in SPLITS]
        lines.append(f"  {name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines) + "\n"


def histogram_array(index: TileIndex, split: str) -> np.ndarray:
    return index.class_histogram(index.split(split))
