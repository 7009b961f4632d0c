"""A local ImageNet ConvNeXt checkpoint (file or directory; classification or UPerNet keys):
read, its keys and shapes checked against the backbone through the asserted lists, loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rsseg.errors import ConfigError
from rsseg.tensorfile import key_problems, read_tensors

# Loading an ImageNet classification checkpoint (ConvNextForImageClassification or ConvNextModel)
# into the backbone: the classifier and the final pooled LayerNorm have no place in it, and the
# backbone's per-stage output norms are new (LayerNorm init: identity up to its affine terms).
ALLOWED_UNEXPECTED = {"layernorm.weight", "layernorm.bias", "classifier.weight", "classifier.bias"}
ALLOWED_MISSING_PREFIX = "hidden_states_norms."


def weights_file(path: Path) -> Path:
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
    f = weights_file(Path(path).expanduser())
    try:
        state = read_tensors(f, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file reads the same to the user
        raise _unreadable(f, exc) from None
    return _unwrap(state, f)


def state_dict_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """key -> shape of a weights file, read without loading the tensors (safetensors header, or
    a memory-mapped torch file)."""
    f = weights_file(Path(path).expanduser())
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
