"""What a ConvNeXt run needs from its spec before any network is trained: whether its ImageNet
weights are there and fit (read without loading them), and its run tags."""

from __future__ import annotations

from pathlib import Path

import torch

from rsseg.errors import ConfigError
from rsseg_baselines.convnext.encoder import ConvNextEncoder
from rsseg_baselines.convnext.weights import check_fit, state_dict_shapes


def imagenet_unavailable(run) -> str | None:
    """Without local ImageNet weights the IN-init rows cannot be made here (nothing is downloaded)."""
    if not run.convnext.weights:
        return ("convnext_imagenet needs local ImageNet ConvNeXt weights (convnext.weights; the sweep files read "
                "RSSEG_CONVNEXT_WEIGHTS); nothing is downloaded, so its cells are skipped")
    return None


def check_imagenet(run) -> list[tuple[str, str]]:
    """At config time: weights that are named must exist."""
    w = run.convnext.weights
    if w and not Path(w).expanduser().exists():
        return [("convnext.weights", f"{w} does not exist (expected a local ImageNet ConvNeXt checkpoint)")]
    return []


def preflight_imagenet(run) -> list[tuple[str, str]]:
    """Before a sweep starts: the weights file must be a state dict of this ConvNeXt (its keys and
    shapes, read without loading the tensors), naming the file when it is not."""
    if not run.convnext.weights:
        return []
    try:
        shapes = state_dict_shapes(run.convnext.weights)
        with torch.device("meta"):
            backbone = ConvNextEncoder(run.convnext, 3, "preflight", imagenet=False).backbone
        check_fit(backbone.state_dict(), shapes, run.convnext.weights)
    except ConfigError as exc:
        return [("convnext.weights", str(exc).removeprefix("convnext.weights: "))]
    return []


def tags(run) -> dict[str, object]:
    return {"backbone": f"convnext-{run.convnext.size}", "weights": "imagenet" if run.method == "convnext_imagenet" else "random"}
