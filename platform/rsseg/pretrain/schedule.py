"""Pure functions of the step number: learning rate, data phase, data position.

Everything a training step needs is a function of (spec, step), so a resumed run recomputes it
instead of restoring opaque scheduler state, and the switch from archive to homogeneous data
happens at the same step with or without a restart.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from rsseg.config.specs import OptimSpec


def lr_at(step: int, optim: OptimSpec, total: int) -> float:
    """Linear warm-up ``warmup_start_lr -> lr`` over ``warmup_iterations`` (the paper: 1e-6 -> 1e-5
    over 10 k), then constant or cosine down to ``min_lr`` at ``total``."""
    w = optim.warmup_iterations
    if w > 0 and step < w:
        return optim.warmup_start_lr + (optim.lr - optim.warmup_start_lr) * step / w
    if optim.after_warmup == "constant":
        return optim.lr
    span = max(1, total - w)
    progress = min(1.0, (step - w) / span)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Phase:
    name: str  # "archive" | "homogeneous"
    start: int  # first global step of the phase
    length: int  # iterations


def phases(archive: int, homogeneous: int) -> list[Phase]:
    """The two-step schedule (paper 4.3.1): archive imagery first, then homogeneous imagery."""
    out = []
    if archive:
        out.append(Phase("archive", 0, archive))
    if homogeneous:
        out.append(Phase("homogeneous", archive, homogeneous))
    return out


def phase_at(plan: list[Phase], step: int) -> tuple[Phase, int]:
    for ph in plan:
        if ph.start <= step < ph.start + ph.length:
            return ph, step - ph.start
    raise IndexError(f"step {step} is past the schedule")


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, phase: str, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 1 if phase == "archive" else 2, epoch]).permutation(n)


@dataclass(frozen=True)
class DataPosition:
    phase: str
    epoch: int
    offset: int  # position of the first sample of the step in the epoch's permutation

    def as_dict(self) -> dict:
        return {"phase": self.phase, "epoch": self.epoch, "offset": self.offset}


def position(phase: Phase, local_step: int, n: int, global_batch: int) -> DataPosition:
    q = local_step * global_batch
    return DataPosition(phase.name, q // n, q % n)


def batch_keys(seed: int, phase: Phase, local_step: int, n: int, global_batch: int, rank: int, world: int) -> list[tuple[int, int]]:
    """This rank's (tile index, augmentation draw) pairs for one step.

    A distributed sampler over an endless, per-epoch reshuffled stream: sample q of the phase is
    element ``q % n`` of permutation ``q // n``; rank r takes the r-th slice of each global batch.
    """
    local = global_batch // world
    keys = []
    for j in range(local):
        q = local_step * global_batch + rank * local + j
        epoch, offset = divmod(q, n)
        keys.append((int(_permutation(seed, phase.name, epoch, n)[offset]), q + (0 if phase.name == "archive" else 1 << 40)))
    return keys
