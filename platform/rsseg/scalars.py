"""Per-step training scalars (loss, gradient norm, an objective's terms) kept on the device they
are computed on and read back to the host in one transfer per flush.

A GPU runs ahead of the Python loop that feeds it; ``loss.item()``, ``float(loss)`` or
``if not torch.isfinite(loss)`` make the host wait for the device, every step. The pre-training
and fine-tuning loops therefore `add` each step's tensors here and `read` them every N steps
(one ``tolist()`` of everything pending: one host synchronisation per flush), which is also where
a non-finite loss is caught — before any checkpoint or validation that follows it.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

Value = torch.Tensor | float | int


class NonFinite(FloatingPointError):
    """A watched scalar was NaN or infinite; ``step`` is the first step where it was."""

    def __init__(self, name: str, value: float, step: int):
        super().__init__(f"{name} is {value} at step {step}")
        self.name, self.value, self.step = name, value, step


class DeviceScalars:
    def __init__(self, watch: Iterable[str] = ()):
        self.watch = tuple(watch)  # names that must stay finite (the loss)
        self.pending: list[tuple[int, dict[str, Value]]] = []

    def add(self, step: int, values: dict[str, Value]) -> None:
        """The scalars of one step, as the loop has them (0-dim tensors stay where they are)."""
        self.pending.append((step, values))

    def __len__(self) -> int:
        return len(self.pending)

    def read(self) -> list[tuple[int, dict[str, float]]]:
        """Every pending step's scalars as floats, in step order; raises `NonFinite` for the first
        watched value that is not finite. One host transfer for all the tensors."""
        slots = [(i, k) for i, (_, vals) in enumerate(self.pending) for k, v in vals.items() if isinstance(v, torch.Tensor)]
        tensors = [self.pending[i][1][k].detach().float().reshape(()) for i, k in slots]
        host = torch.stack([t.to(tensors[0].device) for t in tensors]).tolist() if tensors else []
        out = [(step, {k: (v if not isinstance(v, torch.Tensor) else None) for k, v in vals.items()}) for step, vals in self.pending]
        for (i, k), value in zip(slots, host):
            out[i][1][k] = value
        self.pending = []
        for step, vals in out:
            for name in self.watch:
                if name in vals and not math.isfinite(vals[name]):
                    raise NonFinite(name, vals[name], step)
        return out
