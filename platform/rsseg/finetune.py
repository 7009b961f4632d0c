"""One fine-tuning run: encoder (frozen or trained) + head -> val/test metrics and artifacts.

The same function serves ``platform finetune`` and every sweep trial. The caller passes an
MLflow `tracking.Run` to log to, and optionally ``on_eval`` (called after each validation with
the metrics and a checkpoint state, which a Tune trial reports) and ``resume_state`` (a state
``on_eval`` received earlier) to continue an interrupted run. A run whose method needs a
pre-training receives it (or finds it in the store): fine-tuning never trains one.

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

from rsseg import resolved
from rsseg.config.specs import OptimSpec
from rsseg.encoders import count_parameters
from rsseg.metrics import ConfusionMatrix, SegMetrics
from rsseg.pretrain import schedule
from rsseg.workdir import Workdir

log = logging.getLogger(__name__)
TEST = "test/"  # MLflow prefix of the test split's metrics (validation: "val/")


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
    perf: dict[str, float] = field(default_factory=dict)
    references: dict[str, SegMetrics] = field(default_factory=dict)  # finetune.references on the same split and labels

    def reference_metrics(self) -> dict[str, float]:
        """``reference/<name>/mIoU`` (fraction of 1), as MLflow shows them."""
        return {f"reference/{name}/mIoU": m.miou for name, m in self.references.items()}

    def metrics(self) -> dict[str, float]:
        """The test split's mIoU, pixel accuracy and per-class IoU (fractions of 1)."""
        return self.test.as_dict(self.class_abbrs)

    def test_metrics(self) -> dict[str, float]:
        """The same, as MLflow shows them: under ``test/`` (``test/mIoU``, ``test/IoU/<class>``)."""
        return self.test.as_dict(self.class_abbrs, prefix=TEST)


class NonFiniteLoss(FloatingPointError):
    pass


@dataclass
class Prepared:
    """Everything a run needs, built once: data, encoder, head, feature function, device."""

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
    device: torch.device = torch.device("cpu")
    precision: str = "auto"
    loader_workers: int = 0
    tiles_extracted: int = 0
    pretrained: Any = None  # the pre-training the encoder came from (None: random or imported weights)
    stopwatch: Any = None  # device time in the encoder forward (uncached runs; the cache keeps its own)

    def __post_init__(self):
        from rsseg.device import Stopwatch

        self.stopwatch = self.stopwatch or Stopwatch(self.device)

    def loader(self, ds, batches):
        """Batches of ``ds`` in the given index lists, read ahead by DataLoader workers and pinned
        for the copy to a GPU (with 0 workers: read in this process, in the same order)."""
        from rsseg.data.dataset import collate

        return torch.utils.data.DataLoader(ds, batch_sampler=list(batches), num_workers=self.loader_workers,
                                           pin_memory=self.device.type == "cuda", collate_fn=collate)

    def extraction_rate(self) -> float | None:
        """Tiles per second through the encoder (None when nothing was extracted)."""
        seconds = self.cached.extract_s if self.cached is not None else self.stopwatch.seconds
        tiles = self.cached.cache.stats.tiles_computed if self.cached is not None else self.tiles_extracted
        return tiles / seconds if tiles and seconds > 0 else None


def _optim_spec(ft) -> OptimSpec:
    return OptimSpec(lr=ft.lr, warmup_start_lr=0.0 if ft.warmup_iterations else ft.lr,
                     warmup_iterations=ft.warmup_iterations, after_warmup="cosine", min_lr=0.0,
                     weight_decay=ft.weight_decay, grad_clip=None)


def validation_tiles(run, index):
    """The val split, capped at ``finetune.val_max_tiles`` by a seeded choice (the same every run)."""
    val = index.split("val")
    cap = run.finetune.val_max_tiles
    if cap is not None and val.height > cap:
        order = np.random.default_rng([run.data.split_seed, 3]).permutation(val.height)[:cap]
        val = val[np.sort(order).tolist()]
    return val


def prepare(run, workdir: Workdir, pretrained=None) -> Prepared:
    """The tiles, datasets, encoder (on its device, cached when frozen) and head of a resolved run
    (a bare spec is resolved here)."""
    from rsseg.cache import CachedEncoder, FeatureCache, cache_key
    from rsseg.data import tiles
    from rsseg.device import compute_precision, resolve
    from rsseg.data.dataset import TileDataset, TileReader
    from rsseg.errors import DataError
    from rsseg.heads import NeckHead, build_head
    from rsseg.pretrain.ensure import ensure_pretrained

    res = resolved.of(run)
    run = res.spec
    method, ft = run.plugin, run.finetune
    index = tiles.build(run.data, workdir)
    reader = TileReader.of(index.scenes)
    train_frame = index.subset(run.data.label_ratio)
    if train_frame.height == 0:
        raise DataError(f"{run.data.dataset}: no training tile has labels (label_ratio {run.data.label_ratio})")
    val_frame = validation_tiles(run, index)
    train = TileDataset(reader, train_frame, augment=ft.augment, seed=run.seed)
    val = TileDataset(reader, val_frame)
    test = TileDataset(reader, index.split("test"))

    device = resolve(run.runtime.device)
    if pretrained is None:
        pretrained = ensure_pretrained(res, workdir, allow_training=False)
    encoder = method.build_encoder(run, pretrained)
    if ft.frozen:
        encoder.freeze()
    torch.manual_seed(run.seed)
    head_name = res.head
    neck = method.build_neck(run, encoder.feature_info)
    head = build_head(head_name, neck.feature_info if neck is not None else encoder.feature_info, index.table.num_classes, ft)
    if neck is not None:
        head = NeckHead(neck, head)
    encoder.to(device)
    head.to(device)
    cached = None
    if ft.frozen and ft.cache.enabled and encoder.cache_id is not None:
        key = cache_key(encoder, compute_precision(device, run.runtime.precision))
        cached = CachedEncoder(encoder, FeatureCache.open(workdir.cache / "features", ft.cache.budget_gb, key), key)
    return Prepared(index, reader, train, val, test, encoder, head, head_name, ft.frozen, cached, index.table,
                    device=device, precision=run.runtime.precision, loader_workers=run.runtime.loader_workers, pretrained=pretrained)


def _encode(p: Prepared, images: torch.Tensor, keys, variants) -> list[torch.Tensor]:
    """The encoder forward on the device (timed, without waiting for it, for the run's extraction rate)."""
    with p.stopwatch:
        out = p.encoder(images, keys, variants)
    p.tiles_extracted += images.shape[0]
    return out


def _features(p: Prepared, batch: dict, ds) -> list[torch.Tensor]:
    keys = [ds.tile_ids[i] for i in batch["index"].tolist()]
    variants = batch["variant"].tolist()
    images = batch["image"].to(p.device, non_blocking=True)
    if not p.frozen:
        return p.encoder(images, keys, variants)
    with torch.no_grad():
        if p.cached is None:
            return _encode(p, images, keys, variants)
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
        parts.append((online, [f.float() for f in _encode(p, images[online], [keys[i] for i in online], [variants[i] for i in online])]))
        for idx, maps in parts:
            if out is None:
                out = [torch.empty((len(keys), *m.shape[1:]), dtype=torch.float32, device=p.device) for m in maps]
            for o, m in zip(out, maps):
                o[idx] = m.float()
        return out


def evaluate(p: Prepared, ds, batch_size: int, keep: int = 0) -> tuple[SegMetrics, list[tuple]]:
    """Confusion matrix over a whole split (ignore index excluded); optionally the first
    ``keep`` (image, truth, prediction) triples for overlays."""
    from rsseg.device import autocast

    cm = ConfusionMatrix(p.table.num_classes)
    kept: list[tuple] = []
    p.head.eval()
    if not p.frozen:
        p.encoder.eval()
    batches = [list(range(start, min(len(ds), start + batch_size))) for start in range(0, len(ds), batch_size)]
    with torch.no_grad():
        for batch in p.loader(ds, batches):
            with autocast(p.device, p.precision):
                logits = p.head(_features(p, batch, ds), batch["image"].shape[-2:])
            pred = logits.argmax(1)
            cm.update(pred, batch["mask"].to(p.device, non_blocking=True))  # counted on the device, read once
            for j in range(min(len(pred), keep - len(kept))):
                kept.append((batch["image"][j], batch["mask"][j], pred[j].cpu()))
    p.head.train()
    if not p.frozen:
        p.encoder.train()
    return cm.compute(), kept


class Finetuner:
    """The training loop of one run; `run` below reads it top to bottom.

    A step's loss stays on the device (`rsseg.scalars.DeviceScalars`) and is read back every
    ``FLUSH_EVERY`` iterations and before each validation: one host synchronisation per flush
    rather than one per step, and a non-finite loss still stops the run before it is validated,
    reported or saved."""

    FLUSH_EVERY = 50

    def __init__(self, run, p: Prepared, tracker=None):
        from rsseg.scalars import DeviceScalars
        from rsseg.tracking import MetricBuffer

        self.run, self.p, self.ft = run, p, run.finetune
        self.trainable = list(p.head.parameters()) + ([] if p.frozen else [q for q in p.encoder.parameters() if q.requires_grad])
        self.n_trainable = sum(q.numel() for q in self.trainable)
        self.n_total = count_parameters(p.head) + count_parameters(p.encoder)
        self.optim = _optim_spec(self.ft)
        self.opt = torch.optim.AdamW(self.trainable, lr=self.ft.lr, weight_decay=self.ft.weight_decay)
        self.phase = schedule.Phase("finetune", 0, self.ft.iterations)
        self.tracker = tracker
        self.metrics = MetricBuffer(tracker)
        self.scalars = DeviceScalars(watch=("train/loss",))
        self.start, self.val_history = 0, []
        self.seconds = {"train_s": 0.0, "eval_s": 0.0}

    def restore(self, state: dict[str, Any]) -> None:
        self.p.head.load_state_dict(state["head"])
        if not self.p.frozen and state.get("encoder") is not None:
            self.p.encoder.load_state_dict(state["encoder"])
        self.opt.load_state_dict(state["optimizer"])
        self.start, self.val_history = int(state["iteration"]), list(state.get("val_history", []))

    def log_parameters(self) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics({"params/trainable": self.n_trainable, "params/total": self.n_total,
                                      "ft_params_M": self.n_trainable / 1e6}, step=0)
            from rsseg.device import describe

            leak = self.p.index.leakage(self.run.data.label_ratio)
            self.tracker.set_tags({"head": self.p.head_name, "ft_params_M": f"{self.n_trainable / 1e6:.1f}",
                                   "device": describe(self.p.device), "classes": ",".join(self.p.table.abbrs),
                                   "split_by": self.p.index.params.split_by,
                                   "test_touching_train": f"{leak['touch_train']}/{leak['test']}"})

    def batches(self):
        """The training batches from ``start`` on: iteration i draws ``schedule.batch_keys`` (a pure
        function of seed and i), read ahead by the loader."""
        keys = [schedule.batch_keys(self.run.seed, self.phase, it, len(self.p.train), self.ft.batch_size, 0, 1)
                for it in range(self.start, self.ft.iterations)]
        return iter(self.p.loader(self.p.train, keys))

    def train_step(self, it: int, batch: dict) -> None:
        from rsseg.device import autocast

        t0 = time.perf_counter()
        p = self.p
        lr = schedule.lr_at(it, self.optim, self.ft.iterations)
        for g in self.opt.param_groups:
            g["lr"] = lr
        with autocast(p.device, p.precision):
            features = _features(p, batch, p.train)
            logits = p.head(features, batch["image"].shape[-2:])
            loss = p.head.loss(features, logits, batch["mask"].to(p.device, non_blocking=True))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.seconds["train_s"] += time.perf_counter() - t0
        self.scalars.add(it + 1, {"train/loss": loss.detach(), "train/lr": lr})
        if len(self.scalars) >= self.FLUSH_EVERY:
            self.read_scalars()

    def read_scalars(self) -> None:
        """The kept losses to the host (one synchronisation) and into the metric buffer."""
        from rsseg.scalars import NonFinite

        try:
            points = self.scalars.read()
        except NonFinite as exc:
            lr = schedule.lr_at(exc.step - 1, self.optim, self.ft.iterations)
            raise NonFiniteLoss(f"fine-tuning loss is {exc.value} at iteration {exc.step} (lr {lr:g})") from None
        for step, values in points:
            self.metrics.add(step, values)

    def due(self, done: int) -> bool:
        return done % self.ft.eval_every == 0 or done == self.ft.iterations

    def validate(self, done: int) -> dict[str, float]:
        self.read_scalars()
        t0 = time.perf_counter()
        val, _ = evaluate(self.p, self.p.val, self.ft.eval_batch_size)
        self.seconds["eval_s"] += time.perf_counter() - t0
        metrics = {"iteration": done, **val.as_dict(self.p.table.abbrs, prefix="val/")}
        self.val_history.append(metrics)
        self.metrics.add(done, {k: v for k, v in metrics.items() if k != "iteration"})
        self.metrics.flush()
        return metrics

    def snapshot(self, done: int) -> dict[str, Any]:
        """A copy of the resumable state (state_dict tensors alias the live parameters)."""
        return copy.deepcopy({"head": self.p.head.state_dict(), "optimizer": self.opt.state_dict(), "iteration": done,
                              "val_history": self.val_history, "encoder": None if self.p.frozen else self.p.encoder.state_dict()})

    def test(self) -> tuple[SegMetrics, list[tuple]]:
        self.read_scalars()
        self.metrics.flush()
        t0 = time.perf_counter()
        metrics, kept = evaluate(self.p, self.p.test, self.ft.eval_batch_size, keep=self.ft.log_predictions)
        self.seconds["eval_s"] += time.perf_counter() - t0
        return metrics, kept


def run(run, workdir: Workdir | None = None, *, tracker=None, pretrained=None,
        on_eval: Callable[[int, dict[str, float], dict[str, Any]], None] | None = None,
        resume_state: dict[str, Any] | None = None, on_test: Callable[[], None] | None = None,
        progress: bool = False) -> FinetuneResult:
    """``progress``: print the iterations, their rate and ETA, and each validation's mIoU
    (`rsseg.progress`: in place on a terminal, throttled in a log)."""
    from rsseg import kernels

    res = resolved.of(run)
    run = res.spec
    workdir = workdir or Workdir.resolve()
    kernels.pin(run.runtime.cpu_kernels)
    if run.finetune.threads:
        torch.set_num_threads(run.finetune.threads)
    t_start = time.perf_counter()
    p = prepare(res, workdir, pretrained)
    loop = Finetuner(run, p, tracker)
    if resume_state is not None:
        loop.restore(resume_state)
    loop.log_parameters()
    p.head.train()
    if not p.frozen:
        p.encoder.train()
    batches = loop.batches()
    show = _progress_line(run.finetune.iterations, loop.start) if progress else None
    for it in range(loop.start, run.finetune.iterations):
        loop.train_step(it, next(batches))
        if loop.due(it + 1):
            metrics = loop.validate(it + 1)
            if show is not None:
                show(it + 1, metrics)
            if on_eval is not None:
                on_eval(it + 1, metrics, loop.snapshot(it + 1))
        elif show is not None:
            show(it + 1, None)
    if on_test is not None:
        on_test()
    test, kept = loop.test()
    references = reference_classifiers(run, p)
    seconds = {"total_s": time.perf_counter() - t_start, **loop.seconds}
    cache = p.cached.cache.stats.as_metrics() if p.cached is not None else {}
    trained = run.finetune.iterations - loop.start
    perf = {"perf/iterations_per_s": trained / loop.seconds["train_s"] if trained and loop.seconds["train_s"] > 0 else None,
            "perf/extraction_tiles_per_s": p.extraction_rate()}
    result = FinetuneResult(test, loop.val_history, loop.n_trainable, loop.n_total, p.head_name, seconds, p.table.abbrs, cache,
                            {k: v for k, v in perf.items() if v is not None}, references)
    if tracker is not None:
        _log_final(tracker, run, result, kept, p, workdir)
    return result


def reference_classifiers(run, p: Prepared) -> dict[str, SegMetrics]:
    """The cheap per-pixel classifiers of ``finetune.references``, trained on exactly this run's
    label subset (without augmentation) and scored on its test split: what the method must beat
    for its pre-training to have paid off on this data. Seeded by the run's seed."""
    from rsseg.data.dataset import TileDataset
    from rsseg.data.pixel_baselines import colour_baseline, texture_baseline

    if not run.finetune.references:
        return {}
    train = TileDataset(p.reader, p.index.subset(run.data.label_ratio))
    n = p.table.num_classes
    build = {"colour": lambda: colour_baseline(train, p.test, n),
             "texture": lambda: texture_baseline(train, p.test, n, seed=run.seed)}
    return {name: build[name]().metrics for name in run.finetune.references}


def _progress_line(total: int, start: int) -> Callable[[int, dict[str, float] | None], None]:
    """The fine-tuning's progress line: iterations, rate (the first ones fill the feature cache,
    so the rate climbs) and ETA; a validation's line always shows (its mIoU)."""
    from rsseg.progress import line

    t0 = time.perf_counter()

    def show(done: int, metrics: dict[str, float] | None) -> None:
        rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
        val = f"  val mIoU {100 * metrics['val/mIoU']:.1f}" if metrics and "val/mIoU" in metrics else ""
        line(f"finetune iteration {done}/{total}  {rate:.2f} it/s  ETA {(total - done) / max(rate, 1e-9):.0f} s{val}", "finetune",
             final=bool(val) or done == total)

    return show


def _log_final(tracker, run, result: FinetuneResult, kept, p: Prepared, workdir: Workdir) -> None:
    from rsseg.config.profiles import dump_yaml
    from rsseg.models import save_model
    from rsseg.provenance import stamp
    from rsseg.viz import save_confusion, save_overlays

    tracker.log_metrics({**result.test_metrics(), **{f"time/{k}": v for k, v in result.seconds.items()}, **result.cache, **result.perf,
                         **result.reference_metrics()}, step=run.finetune.iterations)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_confusion(result.test.matrix, result.class_abbrs, d / "confusion_matrix.png",
                       title=f"test mIoU {100 * result.test.miou:.1f} % ({run.method}, label ratio {run.data.label_ratio:g})")
        (d / "metrics.json").write_text(json.dumps({
            "mIoU": result.test.miou, "pixel_accuracy": result.test.pixel_accuracy,
            "IoU": {a: (None if np.isnan(v) else float(v)) for a, v in zip(result.class_abbrs, result.test.iou)},
            "classes": p.table.names, "confusion_matrix": result.test.matrix.tolist(),
            "trainable_params": result.trainable_params, "total_params": result.total_params,
            "val_history": result.val_history, "seconds": result.seconds,
            "references": {name: m.miou for name, m in result.references.items()}, **stamp(),
        }, indent=2))
        (d / "config.yaml").write_text(dump_yaml(run.model_dump(mode="json")))
        for name in ("confusion_matrix.png", "metrics.json", "config.yaml"):
            tracker.log_artifact(d / name)
        if kept:
            images, truths, preds = zip(*kept)
            save_overlays(torch.stack(images), torch.stack(truths), torch.stack(preds), p.table.palette(), d / "predictions.png",
                          names=p.table.names)
            tracker.log_artifact(d / "predictions.png")
    # the trained model, for `platform predict runs:/<run id>` (work directory copy + MLflow artifact)
    model_dir = save_model(workdir.models / tracker.run_id, run, p, result, p.pretrained)
    from rsseg import storage

    storage.push(model_dir)  # object storage: for `platform predict` on the driver (or any node)
    tracker.log_artifacts(model_dir, "model")
    tracker.set_tags({"model": str(model_dir)})
