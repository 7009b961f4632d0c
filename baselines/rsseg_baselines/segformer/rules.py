"""What a SegFormer run needs checked from its spec: the weights directory it names; its run tags."""

from __future__ import annotations

from pathlib import Path


def check(run) -> list[tuple[str, str]]:
    """At config time: weights that are named must be a directory that exists."""
    w = run.segformer.weights
    if w and not Path(w).expanduser().is_dir():
        return [("segformer.weights", f"{w} is not a directory (expected a local transformers MiT / SegFormer model directory)")]
    return []


def tags(run) -> dict[str, object]:
    return {"backbone": f"mit-{run.segformer.size}", "weights": "imagenet" if run.segformer.weights else "random"}
