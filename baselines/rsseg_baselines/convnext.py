"""ConvNeXt-B (transformers) on the encoder contract: random init, or ImageNet weights from a
local file or directory the user supplies (nothing is downloaded).

With transformers' UPerNet head (channels 512, pyramid pooling 1/2/3/6) and the FCN auxiliary
head, ConvNeXt-B counts 122.0 M parameters: the paper's Ft-Params for the fine-tuned ConvNeXt.
``pico`` is a CPU-sized ConvNeXt with the same four-stage structure, for the smoke profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from rsseg.config.specs import Strict
from rsseg.data.registry import input_bands
from rsseg.errors import ConfigError
from rsseg.provenance import fingerprint
from rsseg.tensorfile import key_problems, read_tensors
from rsseg_baselines.stages import StageEncoder

SIZES = {
    "base": {"hidden_sizes": [128, 256, 512, 1024], "depths": [3, 3, 27, 3]},
    "pico": {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 2, 1]},
}
# Loading an ImageNet classification checkpoint (ConvNextForImageClassification or ConvNextModel)
# into the backbone: the classifier and the final pooled LayerNorm have no place in it, and the
# backbone's per-stage output norms are new (LayerNorm init: identity up to its affine terms).
ALLOWED_UNEXPECTED = {"layernorm.weight", "layernorm.bias", "classifier.weight", "classifier.bias"}
ALLOWED_MISSING_PREFIX = "hidden_states_norms."


class ConvNextSpec(Strict):
    size: Literal["base", "pico"] = "base"
    weights: str | None = Field(None, description="ImageNet weights: a local .safetensors/.bin/.pt file or a directory holding one")
    drop_path: float = Field(0.0, ge=0, lt=1)


def backbone_config(spec: ConvNextSpec, in_channels: int):
    from transformers import ConvNextConfig

    return ConvNextConfig(num_channels=in_channels, drop_path_rate=spec.drop_path, out_features=["stage1", "stage2", "stage3", "stage4"],
                          **SIZES[spec.size])


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth"):
            if (path / name).exists():
                return path / name
        raise ConfigError(f"convnext.weights: {path} holds no model.safetensors, pytorch_model.bin, model.pt or model.pth")
    if not path.exists():
        raise ConfigError(f"convnext.weights: {path} does not exist (expected a local ImageNet ConvNeXt checkpoint)")
    return path


def _unreadable(f: Path, exc: Exception) -> ConfigError:
    return ConfigError(f"convnext.weights: {f} is not a readable state dict ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")


def _unwrap(state: Any, f: Path) -> dict[str, Any]:
    """The backbone's entries of a classification or UPerNet checkpoint (prefix stripped)."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"convnext.weights: {f} is not a state dict of tensors")
    for prefix in ("convnext.", "backbone."):  # ConvNextForImageClassification / UperNet checkpoints
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    f = _weights_file(Path(path).expanduser())
    try:
        state = read_tensors(f, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file reads the same to the user
        raise _unreadable(f, exc) from None
    return _unwrap(state, f)


def state_dict_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """key -> shape of a weights file, read without loading the tensors (safetensors header, or
    a memory-mapped torch file)."""
    f = _weights_file(Path(path).expanduser())
    if f.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                return {k: tuple(s) for k, s in ((k, sf.get_slice(k).get_shape()) for k in sf.keys())}
        except Exception as exc:  # noqa: BLE001
            raise _unreadable(f, exc) from None
    return {k: tuple(v.shape) for k, v in read_state_dict(f).items()}


def check_fit(own: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], path: str | Path) -> None:
    """The weights' keys and shapes against the backbone's: only the asserted lists may differ."""
    for prefix in ("convnext.", "backbone."):
        if any(k.startswith(prefix) for k in shapes):
            shapes = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in shapes.items()}
    problems = key_problems(own.keys() - shapes.keys(), shapes.keys() - own.keys(), allowed_missing=(ALLOWED_MISSING_PREFIX,),
                            allowed_unexpected=ALLOWED_UNEXPECTED)
    if problems:
        raise ConfigError(f"convnext.weights: {path} does not fit this ConvNeXt: {'; '.join(problems)}")
    wrong = [k for k in own if k in shapes and tuple(shapes[k]) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise ConfigError(f"convnext.weights: {path}: {k} has shape {tuple(shapes[k])}, this ConvNeXt expects {tuple(own[k].shape)} "
                          f"(convnext.size or the number of bands differs)")


def load_imagenet(backbone: torch.nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load ImageNet weights into a ConvNextBackbone; returns the (asserted) missing/unexpected keys."""
    state = read_state_dict(path)
    own = backbone.state_dict()
    check_fit(own, {k: tuple(v.shape) for k, v in state.items()}, path)
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return {"missing": sorted(k for k in own if k not in state), "unexpected": sorted(k for k in state if k not in own)}


class ConvNextEncoder(StageEncoder):
    """Four maps at strides 4, 8, 16, 32 (ConvNeXt stages 1-4)."""

    def __init__(self, spec: ConvNextSpec, in_channels: int, weights_id: str, imagenet: bool):
        super().__init__(SIZES[spec.size]["hidden_sizes"], weights_id, imagenet)
        from transformers import ConvNextBackbone

        self.backbone = ConvNextBackbone(backbone_config(spec, in_channels))

    def forward(self, x: torch.Tensor, keys=None, variants=None, parts=None) -> list[torch.Tensor]:
        return list(self.backbone(pixel_values=self.normalise(x)).feature_maps)


def build_random(run, pretrained=None) -> ConvNextEncoder:
    spec = run.convnext
    torch.manual_seed(run.seed)
    channels = input_bands(run.data)
    return ConvNextEncoder(spec, channels, fingerprint({"random": spec.model_dump(mode="json"), "seed": run.seed, "c": channels}), imagenet=False)


def build_imagenet(run, pretrained=None) -> ConvNextEncoder:
    spec = run.convnext
    if not spec.weights:
        raise ConfigError("convnext.weights: convnext_imagenet needs local ImageNet weights (a file or directory); nothing is downloaded")
    channels = input_bands(run.data)
    if channels != 3:
        raise ConfigError(f"convnext.weights: ImageNet weights take 3 bands, {run.data.dataset} has {channels} (set data.bands)")
    enc = ConvNextEncoder(spec, channels, "", imagenet=True)
    load_imagenet(enc.backbone, spec.weights)
    f = _weights_file(Path(spec.weights).expanduser())
    enc._weights_id = fingerprint({"imagenet": str(f.resolve()), "size": f.stat().st_size, "mtime": f.stat().st_mtime_ns,
                                   "spec": spec.model_dump(mode="json")})
    return enc


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


def skeleton(run, in_channels: int) -> ConvNextEncoder:
    return ConvNextEncoder(run.convnext, in_channels, "skeleton", imagenet=False)
