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
