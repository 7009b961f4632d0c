"""Weights files: one reader of either format, on the host (DDPM's diffusers directories, ConvNeXt's
ImageNet weights); one rule for which keys may be missing or left over (`key_problems`: every
importer and loader asserts its lists through it) and the loader built on it (`load_checked`: the
DDPM UNet, a saved head, the ViT encoder). Callers word the errors: the file, what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch


def read_tensors(path: Path, mmap: bool = False) -> Any:
    """A ``.safetensors`` file (its tensors), else a torch file loaded with ``weights_only`` (what it
    holds: a state dict, or a checkpoint wrapping one); ``mmap`` maps a torch file instead of reading it."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _allowed(key: str, allowed: Iterable[str]) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed)


def key_problems(missing: Iterable[str], unexpected: Iterable[str], *, allowed_missing: Iterable[str] = (),
                 allowed_unexpected: Iterable[str] = ()) -> list[str]:
    """What is wrong between a network's keys and a weights file's: keys missing from the file and
    keys left over in it, less the allowed ones (a key's name, or a prefix ending in "."), each as
    "missing N key(s): a, b, c, d ..." (empty: they fit). The one rule of every weights loader."""
    out = []
    for word, keys, allowed in (("missing", missing, tuple(allowed_missing)), ("unexpected", unexpected, tuple(allowed_unexpected))):
        bad = sorted(k for k in keys if not _allowed(k, allowed))
        if bad:
            out.append(f"{word} {len(bad)} key(s): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    return out


def load_checked(module: torch.nn.Module, state: dict[str, Any], what: str, *, error: type[Exception],
                 allowed_missing: frozenset[str] = frozenset(), allowed_unexpected: frozenset[str] = frozenset(),
                 extra_unexpected: list[str] | None = None) -> None:
    """``module.load_state_dict(state)`` where only the listed keys may be missing or left over
    (`key_problems`); anything else raises ``error`` as "<what>: missing N key(s): ...".
    ``extra_unexpected``: keys the caller already set aside as not fitting."""
    result = module.load_state_dict(state, strict=False)
    problems = key_problems(result.missing_keys, [*result.unexpected_keys, *(extra_unexpected or [])],
                            allowed_missing=allowed_missing, allowed_unexpected=allowed_unexpected)
    if problems:
        raise error(f"{what}: {'; '.join(problems)}")