"""The driver side of a pre-training: plan it, open its MLflow run, run the workers on Ray Train.

``train(run)`` checks the imagery (tile indexes, phases), opens the MLflow run (or continues the
unfinished one of the same fingerprint) and starts a ``TorchTrainer`` with N workers under a
deterministic Train run name, so re-running the same spec resumes instead of restarting. What
each worker does is `rsseg.pretrain.trainer.Trainer`; whether to train at all is decided by
`rsseg.pretrain.ensure`.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from rsseg import resolved
from rsseg.errors import CheckpointError, ConfigError, DataError
from rsseg.checkpoints import store
from rsseg.pretrain.trainer import Fault, TrainPlan
from rsseg.workdir import Workdir


def plan_checks(res: resolved.ResolvedRun, archive_ds, homogeneous_ds, workers: int) -> tuple[int, int]:
    run = res.spec
    n_archive, n_homogeneous = res.pretraining.counts
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
        from rsseg import storage

        while not self.stop_event.wait(1.0):
            try:
                storage.pull(self.path, fresh=True)  # object storage: rank 0 pushes it
                p = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if p != last:
                last = p
                line(f"{self.label} step {p['step']}/{p['total']} ({p['phase']})  loss {p['loss']:.4f}  "
                     f"lr {p['lr']:.2e}  {p['images_per_s']:.1f} img/s  ETA {p['eta_s'] / 60:.1f} min", final=p["step"] >= p["total"])

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=2)


def _open_run(res: resolved.ResolvedRun, workdir: Workdir, uri: str, tags: dict[str, str] | None):
    from rsseg import tracking

    run, fp = res.spec, res.fingerprint
    tracking.init_store(uri)
    run_tags = res.tags("pretrain").to_tags() | (tags or {})
    # a finished pre-training whose final.pt turned out unusable is rebuilt in its own run
    rebuilt = store.done_run_id(store.StoreDir.for_run(run, workdir))
    mlrun = tracking.start_run(uri, tracking.PRETRAIN_EXPERIMENT, f"pretrain-{run.method}-{fp[:8]}", tags=run_tags, workdir=workdir,
                               reuse_tag=("pretrain_fingerprint", fp), reopen=rebuilt)
    block = run.method_block.model_dump(mode="json") if run.method_block is not None else {}
    mlrun.log_params(tracking.flatten({"pretrain": run.pretrain.model_dump(mode="json"), run.plugin.block or "method": block,
                                       "data": run.data.model_dump(mode="json"), "fingerprint": fp}))
    return mlrun


def train(run, workdir: Workdir | None = None, *, stop_after: int | None = None, resume_from: str | Path | None = None,
          fault: Fault | None = None, tracking_uri: str | None = None, progress: bool = False,
          threads_per_worker: int | None = None, profile: str | None = None, tags: dict[str, str] | None = None,
          concurrent: int = 1, switch_steps: tuple[int, ...] = ()) -> store.Pretrained | None:
    """Train (or resume) the pre-training of ``run``. Returns the finished checkpoint, or None
    when ``stop_after`` stopped it early. ``concurrent``: how many pre-trainings share the
    cluster right now (the sweep driver runs several when they fit). ``switch_steps``: steps of
    the archive phase where other planned runs of the same trunk switch; their trunk points are
    left on the way (this run's own switch step always is). ``run``: the resolved run (a bare
    spec is resolved here, with ``profile``)."""
    from rsseg import kernels, tracking
    from rsseg.pretrain.data import pretrain_datasets
    resolved_run = resolved.of(run, profile)
    run, fp, lin = resolved_run.spec, resolved_run.fingerprint, resolved_run.pretraining.lineage
    workdir = workdir or Workdir.resolve()
    kernels.pin(run.runtime.cpu_kernels)  # before any CPU computation and the local cluster (its workers inherit it)
    runtime = run.pretrain.runtime
    workers = runtime.workers
    sdir = store.StoreDir.for_run(run, workdir)
    archive_ds, homogeneous_ds = pretrain_datasets(run, workdir)  # builds and caches the indexes once, here
    counts = plan_checks(resolved_run, archive_ds, homogeneous_ds, workers)
    if resume_from is not None:
        store.load(Path(resume_from), fp)  # refuse a foreign checkpoint before starting anything
    _say_resume_point(sdir, fp, resume_from, resolved_run, workdir)
    store.write_spec(sdir, run, resolved_run.pretraining.identity)
    _check_space(resolved_run, sdir, int(homogeneous_ds[0]["image"].shape[0]))
    uri = tracking.resolve_uri(tracking_uri or run.tracking.uri, workdir)
    local, res = _placement(run, concurrent, uri, workdir)  # before the MLflow run: a refusal leaves none
    mlrun = _open_run(resolved_run, workdir, uri, (tags or {}) | ({"trunk_note": lin.why} if lin.why else {}))
    mlrun.set_tags({"device": "cuda" if res.use_gpu else "cpu", "workers": str(workers),
                    "ray_train": "local mode (this process)" if local else "worker actors",
                    "resources_per_worker": ", ".join(f"{k} {v:g}" for k, v in res.as_dict().items())})
    plan = TrainPlan(
        fingerprint=fp, store_root=str(sdir.root), workdir=str(workdir.root),
        storage=workdir.storage_arg, run=run,
        in_channels=int(homogeneous_ds[0]["image"].shape[0]), counts=counts, tracking_uri=uri, mlflow_run_id=mlrun.run_id,
        threads=threads_per_worker or max(1, int(res.cpus)), stop_after=stop_after,
        resume_from=str(resume_from) if resume_from else None, fault=fault,
        local_device=("cuda" if res.use_gpu else "cpu") if local else None,
        **_trunk_fields(run, lin, workdir, switch_steps),
    )
    trainer = _torch_trainer(plan, run, res, workdir)
    watcher = _Progress(sdir.progress, f"pretrain {fp[:8]}") if progress else None
    with tracking.tracked(mlrun) as outcome:
        if watcher:
            watcher.start()
        try:
            _fit(trainer, fp)
        finally:
            if watcher:
                watcher.stop()
        if stop_after is not None and stop_after < sum(counts):
            outcome.status, outcome.tags = "KILLED", {"stopped_at": str(stop_after)}
            return None
        found = store.find(run, workdir)
        if found is None:
            raise CheckpointError(f"pre-training {fp} ended without a valid final checkpoint in {sdir.root}")
        return found


def _placement(run, concurrent: int, uri: str, workdir: Workdir):
    """(local mode?, each worker's resources). One worker, alone, with no cluster address runs in
    Ray Train's local mode, in this process: no Ray session is needed (a sweep's local cluster, if
    one is up, has this machine's capacity). Otherwise the cluster is connected and every node is
    checked to reach the tracking server, the storage and the data."""
    from rsseg import clustercheck, raycluster

    runtime = run.pretrain.runtime
    if raycluster.local_mode(runtime.workers, concurrent):
        import ray

        capacity = raycluster.Capacity.of_ray() if ray.is_initialized() else raycluster.Capacity.of_this_machine()
        return True, raycluster.worker_resources(runtime, run.runtime.device, concurrent, capacity)
    raycluster.init()
    res = raycluster.worker_resources(runtime, run.runtime.device, concurrent)
    clustercheck.preflight(uri, workdir, clustercheck.run_paths([], [run]))
    return False, res


def _trunk_fields(run, lin, workdir: Workdir, switch_steps: tuple[int, ...]) -> dict:
    """The TrainPlan's trunk: where its points live, and the switch steps to leave points at."""
    if lin.trunk is None:
        return {}
    return {"trunk": lin.trunk, "trunk_root": str(store.trunk_dir(workdir, run.method, lin.trunk)),
            "switch_steps": tuple(sorted({s for s in (*switch_steps, lin.switch) if 0 < s <= lin.switch}))}


def _torch_trainer(plan: TrainPlan, run, res, workdir: Workdir):
    """Ray Train's TorchTrainer for ``plan``: its workers, storage, failure and checkpoint policy."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rsseg.pretrain.trainer import worker_loop

    from rsseg import storage

    runtime = run.pretrain.runtime
    if plan.local_device is not None:
        # Ray Train's local mode: the same worker_loop and ray.train API in this process, no worker
        # group (so no FailureConfig retries: re-running resumes from the store's last checkpoint)
        _quiet_local_mode()
        return TorchTrainer(worker_loop, train_loop_config={"plan": plan}, scaling_config=ScalingConfig(num_workers=0),
                            run_config=RunConfig(name=f"pretrain-{run.method}-{plan.fingerprint}"))
    _no_retry_of_fatal_errors()
    storage_path, storage_fs = storage.ray_location(workdir)
    return TorchTrainer(
        worker_loop,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=runtime.workers, use_gpu=res.use_gpu, resources_per_worker=res.as_dict(),
                                     placement_strategy=runtime.placement),
        run_config=RunConfig(
            name=f"pretrain-{run.method}-{plan.fingerprint}",
            storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=runtime.max_failures, controller_failure_limit=runtime.controller_failure_limit),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def _say_resume_point(sdir, fp: str, resume_from, res: resolved.ResolvedRun, workdir) -> None:
    """On the terminal (the workers' own log lines stay in Ray's session logs): the checkpoints
    that are skipped as truncated or foreign, and the step training resumes from (its own
    checkpoint, the explicit one, or its trunk's point at or before its switch step)."""
    import sys

    run, lin = res.spec, res.pretraining.lineage
    skipped: list[str] = []
    found = store.latest_valid(sdir, fp, skipped)
    for why in skipped:
        print(f"pretrain {fp[:8]}: {why}", file=sys.stderr, flush=True)
    if found is not None:
        print(f"pretrain {fp[:8]}: resuming from step {found[0]} ({found[1].name})", file=sys.stderr, flush=True)
    elif resume_from is not None:
        print(f"pretrain {fp[:8]}: resuming from {resume_from}", file=sys.stderr, flush=True)
    elif lin.trunk is not None:
        point = store.latest_trunk_point(store.trunk_dir(workdir, run.method, lin.trunk), lin.trunk, lin.switch, verify=False)
        if point is not None:
            print(f"pretrain {fp[:8]}: starting from trunk {lin.trunk[:8]} at step {point[0]} (archive phase shared; "
                  f"{run.pretrain.iterations.n_total - point[0]} iterations to train)", file=sys.stderr, flush=True)


def _check_space(res: resolved.ResolvedRun, sdir, in_channels: int) -> None:
    """Room for the checkpoints the run keeps (weights, EMA weights and two Adam moments, float32,
    ``keep_checkpoints`` of them plus final.pt) before anything starts."""
    from rsseg.diskspace import MB, require

    run = res.spec
    counts = run.plugin.parameter_counts(run, in_channels, 1, res.head)
    if counts is None:
        return
    need = 16 * counts[0] * (run.pretrain.runtime.keep_checkpoints + 1) + 32 * MB
    require(sdir.root, need, f"pre-training {res.fingerprint[:8]} ({run.pretrain.runtime.keep_checkpoints} checkpoints + final)")


def _quiet_local_mode() -> None:
    """Local mode logs a notice when it starts and every report at INFO on the terminal; the
    progress line says the same once a second."""
    import logging

    for name in ("ray.train.v2.api.config", "ray.train.v2._internal.execution.train_fn_utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _no_retry_of_fatal_errors() -> None:
    """Ray Train retries every worker-group error up to ``max_failures``; a full disk or an input
    error fails the same way each time, so those are raised at once. Ray has no public hook for
    this: the policy factory its trainer calls is wrapped (tests/test_pretrain_ray.py checks it)."""
    from ray.train.v2.api import data_parallel_trainer as dpt

    if getattr(dpt.create_failure_policy, "_rsseg", False):
        return
    dpt.create_failure_policy = _failure_policy
    _failure_policy._rsseg = True


def _failure_policy(failure_config):
    from rsseg.pretrain.retry import fatal_errors_raise

    return fatal_errors_raise(failure_config)


def _fit(trainer, fp: str) -> None:
    """``trainer.fit()``, with Ray's wrapped errors turned into one line naming the root cause."""
    import ray

    from rsseg.diskspace import no_space_message
    from rsseg.errors import DiskFullError, RssegError, disk_full_path

    try:
        trainer.fit()
    except RssegError:
        raise
    except Exception as exc:
        path = disk_full_path(exc)
        if path is not None:
            raise DiskFullError(no_space_message(path, f"pre-training {fp[:8]}", resumable=True)) from exc
        if isinstance(exc, ray.exceptions.RayError) or type(exc).__module__.startswith("ray"):
            from rsseg.tracking import error_reason

            raise CheckpointError(f"pre-training {fp} failed: {error_reason(exc)}") from exc
        raise
