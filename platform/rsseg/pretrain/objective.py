"""The objective interface: what the shared trainer needs from DDPM, MAE or ScaleMAE.

An objective owns its network and its loss; the trainer owns the optimiser, warm-up, EMA, mixed
precision, checkpoints and Ray Train. Every objective implements all of it, with these exact
signatures (the trainer calls them one way, never probing)::

    network: nn.Module                               the trainable module (DDP-wrapped by the trainer)
    optim: OptimSpec                                 its optimiser settings
    loss(net, images, generator) -> (loss, logs)     net is the (wrapped) network to call
    describe() -> dict                               enough to rebuild the network from a checkpoint
    artifacts(net, images, generator, out_dir, *, samples, sample_steps) -> [paths]
                                                     pictures for MLflow (generative objectives draw
                                                     ``samples`` images in ``sample_steps`` steps)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from rsseg.config.specs import OptimSpec


def bare(net: torch.nn.Module) -> torch.nn.Module:
    """The network inside the trainer's DDP wrapper (several workers), or ``net`` itself: what an
    objective reaches for the network's own methods (``unpatchify``, sub-modules)."""
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net


class Objective(Protocol):
    network: torch.nn.Module
    optim: OptimSpec

    def loss(self, net: torch.nn.Module, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]: ...

    def describe(self) -> dict[str, Any]: ...

    def artifacts(self, net: torch.nn.Module, images: torch.Tensor, generator: torch.Generator, out_dir: Path, *,
                  samples: int, sample_steps: int) -> list[Path]: ...
