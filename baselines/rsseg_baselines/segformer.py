"""SegFormer (transformers' MiT encoder + the all-MLP decoder) on the encoder contract: random
init, or ImageNet MiT weights from a local transformers directory (nothing is downloaded).

MiT-B4 (depths 3/8/27/3, widths 64/128/320/512) with the 768-channel decoder head
(``finetune.segformer``, rsseg.heads.segformer) counts 64.0 M parameters with 12 classes: the
paper's 64.1 M for SegFormer-B4 in Tables 4-5. ``pico`` is a CPU-sized MiT with the same four
stages (strides 4, 8, 16, 32), for the smoke profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from rsseg.config.specs import Strict
from rsseg.data.registry import input_bands
from rsseg.errors import ConfigError
from rsseg.provenance import fingerprint
from rsseg.tensorfile import key_problems
from rsseg_baselines.stages import StageEncoder

SIZES = {
    "b4": {"depths": [3, 8, 27, 3], "hidden_sizes": [64, 128, 320, 512], "num_attention_heads": [1, 2, 5, 8]},
    "pico": {"depths": [1, 1, 2, 1], "hidden_sizes": [16, 32, 64, 128], "num_attention_heads": [1, 1, 2, 4]},
}
# A SegformerForImageClassification (ImageNet MiT) or SegformerForSemanticSegmentation
# directory into the MiT encoder: only the classifier / the decode head have no place in it.
ALLOWED_UNEXPECTED_PREFIXES = ("classifier.", "decode_head.")


class SegformerSpec(Strict):
    size: Literal["b4", "pico"] = "b4"
    weights: str | None = Field(None, description="ImageNet MiT weights: a local transformers directory (config.json + model.safetensors)")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth of the MiT blocks (SegFormer's 0.1)")


def encoder_config(spec: SegformerSpec, in_channels: int):
    from transformers import SegformerConfig

    return SegformerConfig(num_channels=in_channels, drop_path_rate=spec.drop_path, **SIZES[spec.size])


class SegformerEncoder(StageEncoder):
    """Four maps at strides 4, 8, 16, 32 (the MiT stages' outputs, (B, C_i, H/s, W/s))."""

    def __init__(self, spec: SegformerSpec, in_channels: int, weights_id: str, imagenet: bool, mit: torch.nn.Module | None = None):
        super().__init__(SIZES[spec.size]["hidden_sizes"], weights_id, imagenet)
        from transformers import SegformerModel

        self.mit = mit if mit is not None else SegformerModel(encoder_config(spec, in_channels))

    def forward(self, x: torch.Tensor, keys=None, variants=None, parts=None) -> list[torch.Tensor]:
        maps, h = [], self.normalise(x)
        for stage in self.mit.stages:  # (B, C, H, W) -> (B, C_i, H/s_i, W/s_i)
            h = stage(h)
            maps.append(h)
        return maps


def load_imagenet(spec: SegformerSpec, in_channels: int):
    """The MiT encoder from a local transformers directory, its keys checked against the asserted
    lists (a missing encoder key or a shape that differs is an error naming the directory)."""
    from transformers import SegformerModel
    from transformers.utils import logging as hf_logging

    path = Path(spec.weights).expanduser()
    if not (path.is_dir() and (path / "config.json").exists()):
        raise ConfigError(f"segformer.weights: {path} is not a transformers model directory (expected config.json and model.safetensors)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would print the keys checked below, as a table
    try:
        mit, info = SegformerModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True,
                                                   drop_path_rate=spec.drop_path)
    except Exception as exc:  # noqa: BLE001 - any unreadable directory reads the same to the user
        raise ConfigError(f"segformer.weights: {path}: not loadable as a SegFormer ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = key_problems(info["missing_keys"], info["unexpected_keys"], allowed_unexpected=ALLOWED_UNEXPECTED_PREFIXES)
    if info["mismatched_keys"]:
        problems.append(f"shapes differ for {', '.join(sorted(str(k) for k in info['mismatched_keys'])[:4])}")
    want = SIZES[spec.size]
    got = {k: list(getattr(mit.config, k)) for k in want}
    if got != want or mit.config.num_channels != in_channels:
        problems.append(f"it is a MiT with {got} and {mit.config.num_channels} bands, segformer.size {spec.size!r} with "
                        f"{in_channels} bands expects {want}")
    if problems:
        raise ConfigError(f"segformer.weights: {path} does not fit this SegFormer: {'; '.join(problems)}")
    return mit


def build(run, pretrained=None) -> SegformerEncoder:
    spec = run.segformer
    channels = input_bands(run.data)
    if not spec.weights:
        torch.manual_seed(run.seed)
        return SegformerEncoder(spec, channels, fingerprint({"random": spec.model_dump(mode="json"), "seed": run.seed, "c": channels}),
                                imagenet=False)
    if channels != 3:
        raise ConfigError(f"segformer.weights: ImageNet weights take 3 bands, {run.data.dataset} has {channels} (set data.bands)")
    mit = load_imagenet(spec, channels)
    f = Path(spec.weights).expanduser().resolve()
    stamp = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in f.iterdir() if p.is_file())
    return SegformerEncoder(spec, channels, fingerprint({"imagenet": str(f), "files": stamp, "spec": spec.model_dump(mode="json")}),
                            imagenet=True, mit=mit)


def check(run) -> list[tuple[str, str]]:
    """At config time: weights that are named must be a directory that exists."""
    w = run.segformer.weights
    if w and not Path(w).expanduser().is_dir():
        return [("segformer.weights", f"{w} is not a directory (expected a local transformers MiT / SegFormer model directory)")]
    return []


def tags(run) -> dict[str, object]:
    return {"backbone": f"mit-{run.segformer.size}", "weights": "imagenet" if run.segformer.weights else "random"}


def skeleton(run, in_channels: int) -> SegformerEncoder:
    return SegformerEncoder(run.segformer, in_channels, "skeleton", imagenet=False)
