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
    """``matrix[true, pred]`` pixel counts over everything `update` has seen."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred = pred.reshape(-1).to("cpu", torch.int64)
        target = target.reshape(-1).to("cpu", torch.int64)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() == 0:
            return
        if int(target.max()) >= self.num_classes or int(target.min()) < 0:
            raise ValueError(f"target class {int(target.max())} outside 0..{self.num_classes - 1}")
        idx = target * self.num_classes + pred
        self.matrix += torch.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix

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
