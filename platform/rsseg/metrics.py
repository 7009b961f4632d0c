"""Segmentation metrics: confusion matrix, per-class IoU, mIoU, pixel accuracy.

Intersections and unions are accumulated over the whole split (not averaged per tile), and
pixels with the ignore index are excluded from everything.

Averaging rule for mIoU: a class with TP + FP + FN = 0 over the whole split (absent from both
the truth and the predictions) has an undefined IoU; it is reported as NaN and left out of the
mean. A class present in the truth but never predicted has IoU 0 and counts. An all-ignored tile
adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rsseg.labels import IGNORE_INDEX


class ConfusionMatrix:
    """``matrix[true, pred]`` pixel counts over everything `update` has seen.

    Counted where the predictions are (a GPU's evaluation never waits for the device per batch:
    no boolean selection, no bincount, whose output size CUDA reads back from the device);
    `compute` reads the counts back once. A target outside the class range is counted and
    reported there."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts: torch.Tensor | None = None  # (C*C + 1,) on the predictions' device; the last slot: the rest
        self.span: torch.Tensor | None = None  # (2,) smallest and largest labelled target seen

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        c = self.num_classes
        pred = pred.reshape(-1).to(torch.int64)
        target = target.reshape(-1).to(pred.device, torch.int64)
        if target.numel() == 0:
            return
        keep = target != self.ignore_index
        if self.counts is None:
            self.counts = torch.zeros(c * c + 1, dtype=torch.int64, device=pred.device)
            self.span = torch.zeros(2, dtype=torch.int64, device=pred.device)
        lo, hi = torch.aminmax(torch.where(keep, target, 0))
        self.span = torch.stack([torch.minimum(self.span[0], lo), torch.maximum(self.span[1], hi)])
        idx = torch.where(keep & (target >= 0) & (target < c), target * c + pred, c * c)
        self.counts.index_add_(0, idx, torch.ones_like(idx))

    @property
    def matrix(self) -> torch.Tensor:
        """(C, C) counts on the host."""
        c = self.num_classes
        if self.counts is None:
            return torch.zeros(c, c, dtype=torch.int64)
        lo, hi = self.span.tolist()
        if hi >= c or lo < 0:
            raise ValueError(f"target class {hi if hi >= c else lo} outside 0..{c - 1}")
        return self.counts[: c * c].cpu().reshape(c, c)

    def merge(self, other: "ConfusionMatrix") -> None:
        if other.counts is None:
            return
        if self.counts is None:
            self.counts, self.span = other.counts.clone(), other.span.clone()
            return
        self.counts += other.counts.to(self.counts.device)
        o = other.span.to(self.span.device)
        self.span = torch.stack([torch.minimum(self.span[0], o[0]), torch.maximum(self.span[1], o[1])])

    def compute(self) -> "SegMetrics":
        return SegMetrics.from_matrix(self.matrix.numpy())


@dataclass(frozen=True)
class SegMetrics:
    iou: np.ndarray  # (C,) NaN for classes absent from truth and prediction
    miou: float
    pixel_accuracy: float
    matrix: np.ndarray

    @classmethod
    def from_matrix(cls, m: np.ndarray) -> "SegMetrics":
        m = np.asarray(m, dtype=np.float64)
        tp = np.diag(m)
        fp = m.sum(axis=0) - tp
        fn = m.sum(axis=1) - tp
        union = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
        present = ~np.isnan(iou)
        miou = float(iou[present].mean()) if present.any() else float("nan")
        total = m.sum()
        acc = float(tp.sum() / total) if total > 0 else float("nan")
        return cls(iou=iou, miou=miou, pixel_accuracy=acc, matrix=m.astype(np.int64))

    def as_dict(self, names: list[str], prefix: str = "") -> dict[str, float]:
        """Flat metrics; ``names`` should be MLflow-safe (the tables' class abbreviations)."""
        out = {f"{prefix}mIoU": self.miou, f"{prefix}pixel_accuracy": self.pixel_accuracy}
        for name, v in zip(names, self.iou):
            if not np.isnan(v):
                out[f"{prefix}IoU/{name}"] = float(v)
        return out
