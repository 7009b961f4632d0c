"""One trainer for every pre-training objective, on Ray Train.

The driver (`train`) plans the run (tile indexes, checks), opens its MLflow run and starts a
``TorchTrainer`` with N workers (DDP: gloo on CPU, NCCL on GPU) under a deterministic Train run
name, so re-running the same spec resumes instead of restarting. Each worker (`worker_loop`):

- builds the objective and wraps its network in DDP; rank 0 also keeps the EMA;
- resumes from the newest *valid* checkpoint of the fingerprint's store (or an explicit one);
- draws its share of every global batch from the step number alone (`schedule.batch_keys`):
  a distributed sampler over per-epoch permutations, reading rasterio windows per worker;
- switches from archive to homogeneous imagery at the planned step (two-step schedule);
- every K steps, rank 0 writes an atomic checkpoint (model, EMA, optimiser, step, data
  position, RNG states, resolved spec, git commit) and registers a small pointer to it with
  Ray Train, so a worker failure restarts the group from there (`FailureConfig`);
- rank 0 logs loss / lr / images/s to MLflow and a progress file the driver displays.

Exact resume: learning rate, data order, augmentation and noise are pure functions of the step
(and rank), so a run stopped at step k and resumed ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsseg.errors import CheckpointError, ConfigError, DataError
from rsseg.pretrain import schedule, store
from rsseg.provenance import stamp
from rsseg.workdir import Workdir

log = logging.getLogger(__name__)
PRETRAIN_AUGMENT = dict(stretch=False, rot90=True, flip=True, p=0.5)


@dataclass(frozen=True)
class Fault:
    """Test hook: kill one worker once, at a step (a marker file makes it happen once)."""

    step: int
    rank: int
    marker: str


@dataclass(frozen=True)
class TrainPlan:
    fingerprint: str
    store_root: str
    workdir: str
    run: dict[str, Any]
    method: str
    in_channels: int
    archive_tiles: int
    homogeneous_tiles: int
    counts: tuple[int, int]
    workers: int
    gpu: bool
    tracking_uri: str
    mlflow_run_id: str
    stop_after: int | None = None
    resume_from: str | None = None
    fault: Fault | None = None


# ----------------------------------------------------------------------------------------------
# Data


def _run_spec(run_dict: dict[str, Any]):
    from rsseg.config.specs import run_spec_model

    return run_spec_model().model_validate(run_dict)


def datasets(run, workdir: Workdir):
    """(archive dataset or None, homogeneous dataset): unlabelled tile datasets."""
    from rsseg.config.specs import AugmentSpec
    from rsseg.data import registry, tiles
    from rsseg.data.dataset import TileDataset, TileReader
    import polars as pl

    augment = AugmentSpec(**PRETRAIN_AUGMENT)
    index = tiles.build(run.data, workdir)
    frame = index.frame.filter(pl.col("split").is_in(list(run.pretrain.homogeneous)))
    s = index.scenes
    homogeneous = TileDataset(TileReader(s.scenes, s.table, s.bands, s.value_range), frame, augment=augment,
                              seed=run.pretrain.seed, with_labels=False)
    archive = None
    arc_scenes = registry.archive_scenes(run.pretrain.archive, run.data, workdir)
    if arc_scenes is not None:
        arc_index = tiles.build(run.data, workdir, scenes=arc_scenes)
        archive = TileDataset(TileReader(arc_scenes.scenes, arc_scenes.table, arc_scenes.bands, arc_scenes.value_range),
                              arc_index.frame, augment=augment, seed=run.pretrain.seed, with_labels=False)
    return archive, homogeneous


def _channels(ds) -> int:
    return int(ds[0]["image"].shape[0])


# ----------------------------------------------------------------------------------------------
# Worker


class Ema:
    """Exponential moving average of a network's weights, with the usual warm-up
    (decay_t = min(decay, (1 + t) / (10 + t))) so short runs are not stuck at the init."""

    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in net.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = {k: v.float() for k, v in state["shadow"].items()}
        self.updates = int(state["updates"])


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def _rng_states() -> dict[str, Any]:
    """Global RNG states as tensors and ints (loadable with ``weights_only=True``). The training
    step itself draws from per-step generators; these cover any library that uses the globals."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }


def _restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))


class _StepBatches(torch.utils.data.Sampler):
    """Batch sampler over the steps of one phase: yields this rank's keys per step."""

    def __init__(self, seed: int, phase: schedule.Phase, first: int, last: int, n: int, batch: int, rank: int, world: int):
        self.args = (seed, phase, first, last, n, batch, rank, world)

    def __len__(self) -> int:
        return self.args[3] - self.args[2]

    def __iter__(self):
        seed, phase, first, last, n, batch, rank, world = self.args
        for local in range(first, last):
            yield schedule.batch_keys(seed, phase, local, n, batch, rank, world)


def _batches(data, phases, start: int, end: int, seed: int, batch: int, rank: int, world: int, loader_workers: int):
    """(step, phase, data position, images) for steps [start, end), phase by phase; with
    ``loader_workers`` > 0 the windows are read ahead in DataLoader worker processes."""
    from rsseg.data.dataset import collate

    for phase in phases:
        first = max(0, start - phase.start)
        last = min(phase.length, end - phase.start)
        if first >= last:
            continue
        ds = data[phase.name]
        sampler = _StepBatches(seed, phase, first, last, len(ds), batch, rank, world)
        if loader_workers:
            loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=loader_workers, collate_fn=collate)
        else:
            loader = (collate([ds[k] for k in keys]) for keys in sampler)
        for local, b in zip(range(first, last), loader):
            yield phase.start + local, phase, schedule.position(phase, local, len(ds), batch), b["image"]


def worker_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from rsseg.methods import get
    from rsseg.tracking import Run

    plan = TrainPlan(**{**config["plan"], "fault": Fault(**config["plan"]["fault"]) if config["plan"].get("fault") else None})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = config.get("threads")
    if threads:
        torch.set_num_threads(threads)
    workdir = Workdir.resolve(plan.workdir)
    run = _run_spec(plan.run)
    sdir = store.StoreDir(Path(plan.store_root))
    device = ray.train.torch.get_device()
    n_archive, n_homogeneous = plan.counts
    total = n_archive + n_homogeneous
    phases = schedule.phases(n_archive, n_homogeneous)
    archive_ds, homogeneous_ds = datasets(run, workdir)
    data = {"archive": archive_ds, "homogeneous": homogeneous_ds}
    batch = run.pretrain.batch_size

    torch.manual_seed(run.pretrain.seed)  # identical initial weights on every rank
    objective = get(plan.method).build_objective(run, plan.in_channels)
    net = objective.network
    ema = Ema(net, run.pretrain.ema.decay) if (rank == 0 and run.pretrain.ema.enabled) else None

    # Resume: the newest valid checkpoint of this fingerprint, else an explicit one.
    start, state = 0, None
    found = store.latest_valid(sdir, plan.fingerprint)
    if found is not None:
        start, path = found
        state = store.load(path, plan.fingerprint)
    elif plan.resume_from:
        state = store.load(Path(plan.resume_from), plan.fingerprint)
        start = int(state["step"])
    if state is not None:
        net.load_state_dict(state["model"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        _restore_rng(state["rng"])
        if rank == 0:
            log.info("resuming %s at step %d", sdir.root.name, start)

    model = ray.train.torch.prepare_model(net)
    optim = objective.optim
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    autocast = device.type == "cuda" and run.pretrain.runtime.precision in ("auto", "bf16")
    runtime = run.pretrain.runtime
    tracker = Run(plan.tracking_uri, plan.mlflow_run_id, "") if rank == 0 else None
    logged_up_to = (tracker.last_step("loss") if tracker else None) or -1

    def checkpoint_state(step: int, pos: schedule.DataPosition) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": opt.state_dict(),
            "step": step,
            "data_position": pos.as_dict(),
            "rng": _rng_states(),
            "objective": objective.describe(),
            "spec": plan.run,
            "fingerprint": plan.fingerprint,
            "method": plan.method,
            "resumed_from": start,
            **stamp(),
        }

    def report(metrics: dict[str, float], ckpt_path: Path | None) -> None:
        if rank == 0 and ckpt_path is not None:
            with tempfile.TemporaryDirectory() as d:
                Path(d, "pointer.json").write_text(json.dumps({"path": str(ckpt_path), "step": metrics["step"]}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    model.train()
    pending: list[tuple[int, dict[str, float]]] = []
    t_last, step_last = time.perf_counter(), start
    t0 = time.perf_counter()
    stop = plan.stop_after if plan.stop_after is not None else total
    pos = None
    for step, phase, pos, images in _batches(data, phases, start, min(total, stop), run.pretrain.seed, batch, rank, world,
                                             runtime.loader_workers):
        images = images.to(device, non_blocking=True)
        lr = schedule.lr_at(step, optim, total)
        for group in opt.param_groups:
            group["lr"] = lr
        gen = _step_generator(run.pretrain.seed, step, rank)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, extra = objective.loss(model, images, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if optim.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip))
        opt.step()
        if ema is not None:
            ema.update(net)

        if plan.fault is not None and step == plan.fault.step and rank == plan.fault.rank and not os.path.exists(plan.fault.marker):
            Path(plan.fault.marker).write_text(f"worker {rank} killed at step {step}\n")
            os._exit(1)

        done = step + 1
        loss_t = loss.detach().float().reshape(1).cpu()
        if world > 1:
            dist.all_reduce(loss_t)
            loss_t /= world
        if not torch.isfinite(loss_t).all():
            raise FloatingPointError(f"pre-training loss is {loss_t.item()} at step {done}")
        point = {"loss": float(loss_t), "lr": lr, "phase": 0.0 if phase.name == "archive" else 1.0, **extra}
        if grad_norm is not None:
            point["grad_norm"] = grad_norm
        if step > logged_up_to:
            pending.append((done, point))
        is_last = done == min(total, stop)
        if done % runtime.log_every == 0 or is_last or done % runtime.checkpoint_every == 0:
            now = time.perf_counter()
            ips = (done - step_last) * batch / max(now - t_last, 1e-9)
            t_last, step_last = now, done
            if tracker is not None:
                for s, p in pending:
                    tracker.log_metrics(p, step=s)
                tracker.log_metrics({"images_per_s": ips, "seconds_per_iteration": batch / max(ips, 1e-9)}, step=done)
                pending.clear()
                elapsed = now - t0
                eta = (total - done) * elapsed / max(done - start, 1)
                progress = {"step": done, "total": total, "loss": point["loss"], "lr": lr, "images_per_s": ips,
                            "eta_s": eta, "phase": phase.name}
                from rsseg.atomic import atomic_write_text

                atomic_write_text(sdir.progress, json.dumps(progress))
            ckpt = None
            if rank == 0 and (done % runtime.checkpoint_every == 0 or is_last):
                ckpt = store.save(sdir.ckpt / f"step_{done:08d}.pt", checkpoint_state(done, pos), plan.fingerprint, done)
                store.prune(sdir, runtime.keep_checkpoints)
            report({"step": done, "loss": point["loss"], "lr": lr, "images_per_s": ips}, ckpt)

    if rank == 0 and (plan.stop_after is None or plan.stop_after >= total):
        if pos is None:  # nothing left to train (a restart after the last step): state is loaded
            pos = schedule.DataPosition(**state["data_position"])
        _finish(objective, net, ema, data["homogeneous"], sdir, plan, checkpoint_state(total, pos), device)


def _finish(objective, net, ema, homogeneous, sdir, plan: TrainPlan, state, device) -> None:
    """Rank 0: sample grid artifacts, final.pt and DONE (last)."""
    from rsseg.tracking import Run

    tracker = Run(plan.tracking_uri, plan.mlflow_run_id, "")
    runtime = _run_spec(plan.run).pretrain.runtime
    images = torch.stack([homogeneous[i]["image"] for i in range(min(4, len(homogeneous)))]).to(device)
    view = net
    if ema is not None:  # samples from the EMA weights, the ones features use by default
        import copy

        view = copy.deepcopy(net)
        view.load_state_dict({k: v.to(next(net.parameters()).dtype) for k, v in ema.shadow.items()})
    with tempfile.TemporaryDirectory() as d:
        gen = torch.Generator().manual_seed(0)
        try:
            paths = objective.artifacts(view, images, gen, Path(d), samples=runtime.samples, sample_steps=runtime.sample_steps)
        except TypeError:
            paths = objective.artifacts(view, images, gen, Path(d))
        for p in paths:
            tracker.log_artifact(p, "samples")
    store.finalize(sdir, state, plan.mlflow_run_id)


# ----------------------------------------------------------------------------------------------
# Driver


def plan_checks(run, archive_ds, homogeneous_ds, workers: int) -> tuple[int, int]:
    n_archive, n_homogeneous = run.pretrain.iterations.counts()
    if n_homogeneous and len(homogeneous_ds) == 0:
        raise DataError(
            f"no unlabeled tiles for step-2 pre-training in {run.data.dataset} "
            f"(pretrain.homogeneous = {list(run.pretrain.homogeneous)}); add unlabelled scenes or use the train split"
        )
    if n_archive and (archive_ds is None or len(archive_ds) == 0):
        raise DataError(
            f"pretrain.iterations asks for {n_archive} archive iterations but there is no archive imagery "
            f"(pretrain.archive.source = {run.pretrain.archive.source}); set pretrain.archive.root or use homogeneous only"
        )
    if run.pretrain.batch_size % workers:
        raise ConfigError(f"pretrain.batch_size: {run.pretrain.batch_size} is not divisible by {workers} workers")
    return n_archive, n_homogeneous


class _Progress(threading.Thread):
    """Polls the store's progress file and prints iterations, loss, images/s and ETA."""

    def __init__(self, path: Path, label: str):
        super().__init__(daemon=True)
        self.path, self.label = path, label
        self.stop_event = threading.Event()

    def run(self) -> None:
        from rsseg.progress import line

        last = None
        while not self.stop_event.wait(1.0):
            try:
                p = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if p != last:
                last = p
                line(f"{self.label} step {p['step']}/{p['total']} ({p['phase']})  loss {p['loss']:.4f}  "
                     f"lr {p['lr']:.2e}  {p['images_per_s']:.1f} img/s  ETA {p['eta_s'] / 60:.1f} min")

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=2)


def train(run, workdir: Workdir | None = None, *, workers: int | None = None, gpu: bool | None = None,
          stop_after: int | None = None, resume_from: str | Path | None = None, fault: Fault | None = None,
          tracking_uri: str | None = None, progress: bool = False, threads_per_worker: int | None = None,
          profile: str | None = None, tags: dict[str, str] | None = None) -> store.Pretrained | None:
    """Train (or resume) the pre-training of ``run``. Returns the finished checkpoint, or None
    when ``stop_after`` stopped it early. Callers normally go through `store.ensure`."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rsseg import raycluster, tracking
    from rsseg.methods import get

    workdir = workdir or Workdir.resolve()
    method = get(run.method)
    runtime = run.pretrain.runtime
    workers = workers or runtime.workers
    gpu = runtime.gpu if gpu is None else gpu
    fp = store.fingerprint(run)
    sdir = store.StoreDir.for_run(run, workdir)
    archive_ds, homogeneous_ds = datasets(run, workdir)  # builds and caches the indexes once, here
    counts = plan_checks(run, archive_ds, homogeneous_ds, workers)
    if resume_from is not None:
        store.load(Path(resume_from), fp)  # refuse a foreign checkpoint before starting anything
    store.write_spec(sdir, run)

    uri = tracking.resolve_uri(tracking_uri or run.tracking.uri, workdir)
    tracking.init_store(uri)
    from rsseg.provenance import git_commit

    mlrun = tracking.start_run(
        uri, tracking.PRETRAIN_EXPERIMENT, f"pretrain-{run.method}-{fp[:8]}",
        tags={"pretrain_fingerprint": fp, "method": run.method, "dataset": run.data.dataset, "kind": "pretrain",
              "git_commit": git_commit(), "profile": profile or "", **(tags or {}), **method.run_tags(run)},
        workdir=workdir, reuse_tag=("pretrain_fingerprint", fp),
    )
    mlrun.log_params(tracking.flatten({"pretrain": run.pretrain.model_dump(mode="json"), method.block or "method": run.block(method.block).model_dump(mode="json") if method.block else {}, "data": run.data.model_dump(mode="json"), "fingerprint": fp}))

    plan = TrainPlan(
        fingerprint=fp, store_root=str(sdir.root), workdir=str(workdir.root), run=run.model_dump(mode="json"),
        method=run.method, in_channels=_channels(homogeneous_ds), archive_tiles=len(archive_ds) if archive_ds else 0,
        homogeneous_tiles=len(homogeneous_ds), counts=counts, workers=workers, gpu=gpu, tracking_uri=uri,
        mlflow_run_id=mlrun.run_id, stop_after=stop_after, resume_from=str(resume_from) if resume_from else None,
        fault=fault,
    )
    raycluster.init()
    cpus = raycluster.cpus_per_worker(workers, gpu)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"plan": asdict(plan), "threads": threads_per_worker or max(1, int(cpus))},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=f"pretrain-{run.method}-{fp}",
            storage_path=str(workdir.ray_storage),
            failure_config=FailureConfig(max_failures=runtime.max_failures, controller_failure_limit=runtime.controller_failure_limit),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    watcher = _Progress(sdir.progress, f"pretrain {fp[:8]}") if progress else None
    if watcher:
        watcher.start()
    try:
        trainer.fit()
    except BaseException as exc:
        mlrun.set_tags({"error": str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__})
        mlrun.end("FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
        if isinstance(exc, ray.exceptions.RayError) or type(exc).__module__.startswith("ray"):
            raise CheckpointError(f"pre-training {fp} failed: {_root_cause(exc)}") from exc
        raise
    finally:
        if watcher:
            watcher.stop()
    if stop_after is not None and stop_after < sum(counts):
        mlrun.set_tags({"stopped_at": str(stop_after)})
        mlrun.end("KILLED")
        return None
    found = store.find(run, workdir)
    if found is None:
        mlrun.end("FAILED")
        raise CheckpointError(f"pre-training {fp} ended without a valid final checkpoint in {sdir.root}")
    mlrun.end("FINISHED")
    return found


def _root_cause(exc: BaseException) -> str:
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return text[-1] if text else type(seen).__name__
