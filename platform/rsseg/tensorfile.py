"""Reading a weights file of either format, on the host: one reader for every importer (DDPM's
diffusers directories, ConvNeXt's ImageNet weights). Callers turn its errors into their own
one-line messages (the file, what was expected)."""

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
                 allowed_missing: frozenset[str] = frozenset(), allowed_unexpected: tuple[str, ...] = (),
                 extra_unexpected: list[str] | None = None) -> None:
    """``module.load_state_dict(state)`` where only the listed keys may be missing (exact names) or
    left over (these prefixes); anything else raises ``error`` as "<what>: missing [...], unexpected
    [...]". ``extra_unexpected``: keys the caller already set aside as not fitting. The one helper
    every weights loader uses (the house rule: an explicit, asserted list of allowed keys)."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(allowed_unexpected)]  # () allows none
    unexpected += extra_unexpected or []
    if missing or unexpected:
        raise error(f"{what}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
