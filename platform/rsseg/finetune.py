"""One fine-tuning run: encoder (frozen or trained) + head -> val/test metrics and artifacts.

The same function serves ``platform finetune`` and every sweep trial. The caller passes an
MLflow `tracking.Run` to log to, and optionally ``on_eval`` (called after each validation with
the metrics and a checkpoint state, which a Tune trial reports) and ``resume_state`` (a state
``on_eval`` received earlier) to continue an interrupted run.

Training follows the paper (4.2.2): AdamW (lr 2e-4, weight decay 1e-4), cosine schedule,
300 iterations, augmentation = random linear stretch (5-15 % cut) + rot90 + flips. Batches are a
pure function of (seed, iteration), so a resumed run sees the data an uninterrupted one would.

With a frozen encoder and fixed noise, features come from the content-addressed cache
(rsseg.cache): computed once per (tile, augmentation variant) and shared by every run and trial
with the same encoder; the radiometric stretch changes the input, so stretched tiles are always
computed online.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from rsseg.config.specs import OptimSpec
from rsseg.data.classes import IGNORE_INDEX
from rsseg.encoders import count_parameters
from rsseg.metrics import ConfusionMatrix, SegMetrics
from rsseg.pretrain import schedule
from rsseg.workdir import Workdir

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    test: SegMetrics
    val_history: list[dict[str, float]]
    trainable_params: int
    total_params: int
    head: str
    seconds: dict[str, float]
    class_abbrs: list[str]
    cache: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return self.test.as_dict(self.class_abbrs)


class NonFiniteLoss(FloatingPointError):
    pass


@dataclass
class Prepared:
    """Everything a run needs, built once: data, encoder, head, feature function."""

    index: Any
    reader: Any
    train: Any
    val: Any
    test: Any
    encoder: Any
    head: torch.nn.Module
    head_name: str
    frozen: bool
    cached: Any
    table: Any


def _optim_spec(ft) -> OptimSpec:
    return OptimSpec(lr=ft.lr, warmup_start_lr=0.0 if ft.warmup_iterations else ft.lr,
                     warmup_iterations=ft.warmup_iterations, after_warmup="cosine", min_lr=0.0,
                     weight_decay=ft.weight_decay, grad_clip=None)


def prepare(run, workdir: Workdir, pretrained=None) -> Prepared:
    from rsseg.cache import CachedEncoder, FeatureCache
    from rsseg.data import tiles
    from rsseg.data.dataset import TileDataset, TileReader
    from rsseg.heads import build_head
    from rsseg.methods import get
    from rsseg.pretrain import store

    method = get(run.method)
    ft = run.finetune
    index = tiles.build(run.data, workdir)
    s = index.scenes
    reader = TileReader(s.scenes, s.table, s.bands, s.value_range)
    train_frame = index.subset(run.data.label_ratio)
    if train_frame.height == 0:
        from rsseg.errors import DataError

        raise DataError(f"{run.data.dataset}: no training tile has labels (label_ratio {run.data.label_ratio})")
    val_frame = index.split("val")
    if ft.val_max_tiles is not None and val_frame.height > ft.val_max_tiles:
        order = np.random.default_rng([run.data.split_seed, 3]).permutation(val_frame.height)[: ft.val_max_tiles]
        val_frame = val_frame[np.sort(order).tolist()]
    train = TileDataset(reader, train_frame, augment=ft.augment, seed=run.seed)
    val = TileDataset(reader, val_frame)
    test = TileDataset(reader, index.split("test"))

    if pretrained is None and method.needs_pretraining(run):
        pretrained = store.ensure(run, workdir)
    encoder = method.build_encoder(run, pretrained)
    frozen = ft.frozen
    if frozen:
        encoder.freeze()
    torch.manual_seed(run.seed)
    head_name = ft.head if ft.head != "auto" else method.default_head(frozen)
    neck = method.build_neck(run, encoder.feature_info)
    head = build_head(head_name, neck.feature_info if neck is not None else encoder.feature_info, index.table.num_classes, ft)
    if neck is not None:
        from rsseg.heads import NeckHead

        head = NeckHead(neck, head)
    cached = None
    if frozen and ft.cache.enabled and encoder.cache_id is not None:
        cached = CachedEncoder(encoder, FeatureCache.open(workdir.cache / "features", ft.cache.budget_gb, encoder.cache_id))
    return Prepared(index, reader, train, val, test, encoder, head, head_name, frozen, cached, index.table)


def _features(p: Prepared, batch: dict, ds) -> list[torch.Tensor]:
    keys = [ds.tile_ids[i] for i in batch["index"].tolist()]
    variants = batch["variant"].tolist()
    images = batch["image"]
    if not p.frozen:
        return p.encoder(images, keys, variants)
    with torch.no_grad():
        if p.cached is None:
            return p.encoder(images, keys, variants)
        stretched = batch["stretched"]
        if not stretched.any():
            return p.cached(images, keys, variants)
        # Stretched tiles differ from the cached input: compute those online, the rest cached.
        out = None
        plain = (~stretched).nonzero().flatten().tolist()
        online = stretched.nonzero().flatten().tolist()
        parts = []
        if plain:
            parts.append((plain, p.cached(images[plain], [keys[i] for i in plain], [variants[i] for i in plain])))
        parts.append((online, [f.float() for f in p.encoder(images[online], [keys[i] for i in online], [variants[i] for i in online])]))
        for idx, maps in parts:
            if out is None:
                out = [torch.empty((len(keys), *m.shape[1:]), dtype=torch.float32) for m in maps]
            for o, m in zip(out, maps):
                o[idx] = m.float()
        return out


def evaluate(p: Prepared, ds, batch_size: int, keep: int = 0) -> tuple[SegMetrics, list[tuple]]:
    """Confusion matrix over a whole split (ignore index excluded); optionally the first
    ``keep`` (image, truth, prediction) triples for overlays."""
    from rsseg.data.dataset import collate

    cm = ConfusionMatrix(p.table.num_classes)
    kept: list[tuple] = []
    p.head.eval()
    if not p.frozen:
        p.encoder.eval()
    with torch.no_grad():
        for start in range(0, len(ds), batch_size):
            batch = collate([ds[i] for i in range(start, min(len(ds), start + batch_size))])
            logits = p.head(_features(p, batch, ds), batch["image"].shape[-2:])
            pred = logits.argmax(1)
            cm.update(pred, batch["mask"])
            for j in range(len(pred)):
                if len(kept) < keep:
                    kept.append((batch["image"][j], batch["mask"][j], pred[j]))
    p.head.train()
    if not p.frozen:
        p.encoder.train()
    return cm.compute(), kept


def _loss(p: Prepared, features, logits, mask) -> torch.Tensor:
    if (mask != IGNORE_INDEX).sum() == 0:
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX)
    aux = getattr(p.head, "auxiliary_logits", None)
    if aux is not None:
        from rsseg.heads.upernet import AUX_WEIGHT

        aux_logits = p.head.auxiliary_logits(features, mask.shape[-2:])
        if aux_logits is not None:
            loss = loss + AUX_WEIGHT * F.cross_entropy(aux_logits, mask, ignore_index=IGNORE_INDEX)
    return loss


def run(run, workdir: Workdir | None = None, *, tracker=None, pretrained=None,
        on_eval: Callable[[int, dict[str, float], dict[str, Any]], None] | None = None,
        resume_state: dict[str, Any] | None = None) -> FinetuneResult:
    from rsseg.data.dataset import collate

    workdir = workdir or Workdir.resolve()
    ft = run.finetune
    if ft.threads:
        torch.set_num_threads(ft.threads)
    t_start = time.perf_counter()
    p = prepare(run, workdir, pretrained)
    abbrs = p.table.abbrs
    trainable = [q for q in p.head.parameters()] + ([] if p.frozen else [q for q in p.encoder.parameters() if q.requires_grad])
    n_trainable = sum(q.numel() for q in trainable)
    n_total = count_parameters(p.head) + count_parameters(p.encoder)
    optim = _optim_spec(ft)
    opt = torch.optim.AdamW(trainable, lr=ft.lr, weight_decay=ft.weight_decay)
    start, val_history = 0, []
    if resume_state is not None:
        p.head.load_state_dict(resume_state["head"])
        if not p.frozen and resume_state.get("encoder") is not None:
            p.encoder.load_state_dict(resume_state["encoder"])
        opt.load_state_dict(resume_state["optimizer"])
        start, val_history = int(resume_state["iteration"]), list(resume_state.get("val_history", []))
    if tracker is not None:
        tracker.log_metrics({"params/trainable": n_trainable, "params/total": n_total,
                             "ft_params_M": n_trainable / 1e6}, step=0)
        tracker.set_tags({"head": p.head_name, "ft_params_M": f"{n_trainable / 1e6:.1f}"})

    phase = schedule.Phase("finetune", 0, ft.iterations)
    p.head.train()
    if not p.frozen:
        p.encoder.train()
    t_train, t_eval = 0.0, 0.0
    pending: list[tuple[int, dict[str, float]]] = []
    for it in range(start, ft.iterations):
        t0 = time.perf_counter()
        keys = schedule.batch_keys(run.seed, phase, it, len(p.train), ft.batch_size, 0, 1)
        batch = collate([p.train[k] for k in keys])
        lr = schedule.lr_at(it, optim, ft.iterations)
        for g in opt.param_groups:
            g["lr"] = lr
        features = _features(p, batch, p.train)
        logits = p.head(features, batch["image"].shape[-2:])
        loss = _loss(p, features, logits, batch["mask"])
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"fine-tuning loss is {loss.item()} at iteration {it + 1} (lr {lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t_train += time.perf_counter() - t0
        done = it + 1
        pending.append((done, {"train/loss": float(loss.detach()), "train/lr": lr}))
        if done % ft.eval_every == 0 or done == ft.iterations:
            t1 = time.perf_counter()
            val, _ = evaluate(p, p.val, ft.eval_batch_size)
            t_eval += time.perf_counter() - t1
            metrics = {"iteration": done, **val.as_dict(abbrs, prefix="val/")}
            val_history.append(metrics)
            if tracker is not None:
                for s, m in pending:
                    tracker.log_metrics(m, step=s)
                tracker.log_metrics({k: v for k, v in metrics.items() if k != "iteration"}, step=done)
            pending.clear()
            if on_eval is not None:
                # a snapshot (state_dict tensors alias the live parameters, which keep training)
                state = copy.deepcopy({"head": p.head.state_dict(), "optimizer": opt.state_dict(), "iteration": done,
                                       "val_history": val_history, "encoder": None if p.frozen else p.encoder.state_dict()})
                on_eval(done, metrics, state)
    if tracker is not None and pending:
        for s, m in pending:
            tracker.log_metrics(m, step=s)

    t1 = time.perf_counter()
    test, kept = evaluate(p, p.test, ft.eval_batch_size, keep=ft.log_predictions)
    t_eval += time.perf_counter() - t1
    seconds = {"total_s": time.perf_counter() - t_start, "train_s": t_train, "eval_s": t_eval}
    cache = p.cached.cache.stats.as_metrics() if p.cached is not None else {}
    result = FinetuneResult(test, val_history, n_trainable, n_total, p.head_name, seconds, abbrs, cache)
    if tracker is not None:
        _log_final(tracker, run, result, kept, p)
    return result


def _log_final(tracker, run, result: FinetuneResult, kept, p: Prepared) -> None:
    from rsseg.config.resolve import dump_yaml
    from rsseg.provenance import stamp
    from rsseg.viz import save_confusion, save_overlays

    tracker.log_metrics({**result.metrics(), **{f"time/{k}": v for k, v in result.seconds.items()}, **result.cache},
                        step=run.finetune.iterations)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_confusion(result.test.matrix, result.class_abbrs, d / "confusion_matrix.png",
                       title=f"test mIoU {100 * result.test.miou:.1f} % ({run.method}, label ratio {run.data.label_ratio:g})")
        (d / "metrics.json").write_text(json.dumps({
            "mIoU": result.test.miou, "pixel_accuracy": result.test.pixel_accuracy,
            "IoU": {a: (None if np.isnan(v) else float(v)) for a, v in zip(result.class_abbrs, result.test.iou)},
            "classes": p.table.names, "confusion_matrix": result.test.matrix.tolist(),
            "trainable_params": result.trainable_params, "total_params": result.total_params,
            "val_history": result.val_history, "seconds": result.seconds, **stamp(),
        }, indent=2))
        (d / "config.yaml").write_text(dump_yaml(run.model_dump(mode="json")))
        for name in ("confusion_matrix.png", "metrics.json", "config.yaml"):
            tracker.log_artifact(d / name)
        if kept:
            images, truths, preds = zip(*kept)
            save_overlays(torch.stack(images), torch.stack(truths), torch.stack(preds), p.table.palette(), d / "predictions.png")
            tracker.log_artifact(d / "predictions.png")
