"""Weights files: one reader of either format, on the host (DDPM's diffusers directories, ConvNeXt's
ImageNet weights), and one loader that asserts which keys may be missing or left over (the DDPM
UNet, a saved head, the ViT encoder). Callers word the errors: the file, what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def read_tensors(path: Path, mmap: bool = False) -> Any:
    """A ``.safetensors`` file (its tensors), else a torch file loaded with ``weights_only`` (what it
    holds: a state dict, or a checkpoint wrapping one); ``mmap`` maps a torch file instead of reading it."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_checked(module: torch.nn.Module, state: dict[str, Any], what: str, *, error: type[Exception],
                 allowed_missing: frozenset[str] = frozenset(), allowed_unexpected: frozenset[str] = frozenset(),
                 extra_unexpected: list[str] | None = None) -> None:
    """``module.load_state_dict(state)`` where only the listed keys may be missing or left over;
    anything else raises ``error`` as "<what>: missing [...], unexpected
    [...]". ``extra_unexpected``: keys the caller already set aside as not fitting. The one helper
    every weights loader uses (the house rule: an explicit, asserted list of allowed keys)."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    unexpected = [k for k in result.unexpected_keys if k not in allowed_unexpected]
    unexpected += extra_unexpected or []
    if missing or unexpected:
        raise error(f"{what}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
