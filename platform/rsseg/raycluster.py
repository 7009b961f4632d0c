"""Connecting to Ray: a local cluster by default, an existing one through --address / RAY_ADDRESS.

``ray.init(address="local")`` is explicit: a stale cluster file from an earlier session would
otherwise make ``ray.init(num_cpus=...)`` try to connect to a dead cluster.

A local cluster listens on the loopback interface only (Ray binds its GCS, raylet and agents to
the node's address, by default the machine's external one and 0.0.0.0; its single-machine switch
``ENABLE_RAY_CLUSTER`` makes that 127.0.0.1), and keeps its session files under the work
directory (``<workdir>/ray/tmp``) when the path leaves room for Ray's Unix sockets.

A driver killed with SIGKILL cannot stop its cluster, and Ray's dashboard and runtime-env agents
then outlive it (re-parented to init). Each local cluster is therefore recorded under the work
directory (``<workdir>/ray/local-<pid>.json``: driver pid, start time, session dir), and the next
local start from that work directory stops what is left of the sessions whose driver is gone.

A local cluster starts lean (`LOCAL_DEFAULTS`, measured in docs/benchmarks.md, CLI start-up): no
dashboard (its head and ~10 module processes compete with the run for the CPUs; the MLflow UI is
the platform's view, ``RSSEG_RAY_DASHBOARD=1`` turns it back on), no Ray Train preemption watcher
(one more actor process per training, watching for node drains a single machine never has), and
the Train controller polls its workers every 0.5 s instead of 2 s (a finished training is noticed
sooner). A user's own setting of any of these environment variables wins.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

from rsseg.errors import ConfigError


# the GCS address of the local cluster this process started, if it did (`local_mode`)
_local_gcs: str | None = None

LOCAL_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def init(address: str | None = None, num_cpus: int | None = None, warm: tuple[str, ...] = ()) -> None:
    """Connect (or start a local cluster). ``warm``: modules the caller imports next (MLflow, the
    method's networks), imported in a background thread meanwhile: ray.init mostly waits for the
    cluster's processes, so those seconds of imports cost nothing (docs/benchmarks.md)."""
    import ray

    if ray.is_initialized():
        return
    warmer = _warm(warm) if warm else None
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict = dict(
        logging_level=logging.WARNING,
        # Worker output stays in Ray's session logs unless asked for: the CLI shows progress.
        log_to_driver=os.environ.get("RSSEG_RAY_LOGS", "0") == "1",
    )
    from rsseg.kernels import VARIABLES

    # what the workers of an existing cluster need of this environment (a local one inherits it)
    env = {k: os.environ[k] for k in ("RSSEG_WORKDIR", "RSSEG_STORAGE", "MLFLOW_TRACKING_URI", "GDAL_CACHEMAX", *VARIABLES)
           if k in os.environ}
    if address == "local":
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        kwargs["include_dashboard"] = os.environ.get("RSSEG_RAY_DASHBOARD", "0") == "1"
        # token authentication is Ray's default for a new local cluster and stays on; only its
        # notice, printed on every command, is dropped
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        for key, value in LOCAL_DEFAULTS.items():
            os.environ.setdefault(key, value)  # read by the Train controller, which inherits this environment
        loopback_only()
        temp = local_temp_dir()
        if temp is not None:
            kwargs["_temp_dir"] = str(temp)
        reap_leftovers()
    elif env:
        kwargs["runtime_env"] = {"env_vars": env}
    # ray.init replaces the process's SIGTERM handler with sys.exit; ours (the CLI's: SIGTERM ends a
    # command like Ctrl-C, its runs marked KILLED) is put back, or a scheduler's SIGTERM (SLURM,
    # Kubernetes) would leave the trials' runs RUNNING
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:  # ray:// or host:port where no cluster answers
        reason = (str(exc).strip().splitlines() or ["no answer"])[0][:200]
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({reason}); start one (`ray start --head`) "
                          "or fix --address / RAY_ADDRESS") from None
    finally:
        if callable(sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
        if warmer is not None:
            warmer.join()
    if address == "local":
        global _local_gcs
        _local_gcs = ray.get_runtime_context().gcs_address
        _record_session()


def _warm(modules: tuple[str, ...]):
    """A daemon thread importing ``modules``. torch, the largest package both threads would
    import, is imported here first, in the caller's thread, so the two never import it at once
    (a concurrent circular import hands one of them a partly initialised module). A failing
    import is left to the caller's own import, which raises it where it belongs."""
    import importlib
    import threading

    import torch  # noqa: F401 - see the docstring

    def run() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - see the docstring
                pass

    thread = threading.Thread(target=run, name="rsseg-warm-imports", daemon=True)
    thread.start()
    return thread


def _session_files() -> list:
    from rsseg.workdir import Workdir

    root = Workdir.resolve().ray_local
    return sorted(root.glob("local-*.json")) if root.is_dir() else []


def _record_session() -> None:
    import json

    import psutil
    import ray

    from rsseg.atomic import atomic_write_text
    from rsseg.workdir import Workdir

    session = ray._private.worker._global_node.get_session_dir_path()
    root = Workdir.resolve().ray_local
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_text(root / f"local-{os.getpid()}.json", json.dumps(
        {"driver_pid": os.getpid(), "driver_started": psutil.Process().create_time(), "session_dir": session}))


def _alive(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0  # same pid, same process (no reuse)
    except psutil.Error:
        return False


def reap_leftovers() -> int:
    """Stop the processes of local clusters whose driver died without stopping them (this work
    directory's, this user's); returns how many were stopped."""
    import json

    import psutil

    stopped = 0
    for record in _session_files():
        try:
            info = json.loads(record.read_text())
            pid, started, session = int(info["driver_pid"]), float(info["driver_started"]), str(info["session_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            continue
        if _alive(pid, started):
            continue  # another driver on this work directory is running: its cluster is live
        prefix = session.rstrip("/") + "/"
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and any(f.path.startswith(prefix) for f in proc.open_files()):
                    proc.kill()
                    stopped += 1
            except psutil.Error:
                continue
        record.unlink(missing_ok=True)
    return stopped


def forget_session() -> None:
    """This driver stopped its local cluster itself: nothing to reap later."""
    from rsseg.workdir import Workdir

    (Workdir.resolve().ray_local / f"local-{os.getpid()}.json").unlink(missing_ok=True)


def loopback_only() -> None:
    """Keep a local cluster on 127.0.0.1 (this process and the Ray processes it starts)."""
    import ray._private.ray_constants as constants

    constants.ENABLE_RAY_CLUSTER = False
    os.environ[constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"


# Ray's Unix sockets live under <temp>/session_<date>_<pid>/sockets/<name>: with the ~60 characters
# Ray adds, a temp dir longer than this would exceed the 107-byte socket path limit.
MAX_TEMP_DIR = 40


def local_temp_dir() -> "os.PathLike | None":
    """``<workdir>/ray/tmp`` (created 0700), or None (Ray's /tmp/ray) when that path is too long."""
    from rsseg.workdir import Workdir

    temp = Workdir.resolve().ray_local / "tmp"
    if len(str(temp)) > MAX_TEMP_DIR:
        return None
    temp.mkdir(parents=True, exist_ok=True, mode=0o700)
    return temp


def total_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def total_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def largest_node(resource: str = "CPU") -> float:
    """The most of ``resource`` any one alive node has: a Train worker's request must fit there."""
    import ray

    return max((float(n["Resources"].get(resource, 0.0)) for n in ray.nodes() if n.get("Alive")), default=0.0)


@dataclass(frozen=True)
class WorkerResources:
    """What each Ray Train worker of one pre-training reserves."""

    cpus: float
    gpus: float

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0

    def as_dict(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}


@dataclass(frozen=True)
class Capacity:
    """What the pre-training workers can be given: CPUs and GPUs in all, and on the largest node
    (a worker's request must fit on one node). ``where`` names it in messages."""

    cpus: float
    gpus: float
    node_cpus: float
    node_gpus: float
    where: str = "the Ray cluster"

    @classmethod
    def of_ray(cls) -> "Capacity":
        return cls(total_cpus(), total_gpus(), largest_node("CPU"), largest_node("GPU"))

    @classmethod
    def of_this_machine(cls) -> "Capacity":
        """This process's machine, for Ray Train's local mode (no cluster): the CPUs it may run on
        (its affinity, as Ray counts them for a local cluster) and the GPUs torch sees."""
        import torch

        cpus, gpus = float(len(os.sched_getaffinity(0))), float(torch.cuda.device_count())
        return cls(cpus, gpus, cpus, gpus, "this machine")


def worker_resources(runtime, device: str, concurrent: int = 1, capacity: Capacity | None = None) -> WorkerResources:
    """Per-worker CPUs and GPUs of a pre-training, ``concurrent`` of which share the cluster
    (``capacity``: the Ray cluster's unless given).

    GPUs: ``pretrain.runtime.gpus_per_worker``, else 1 when the device policy says CUDA (``cuda``,
    or ``auto`` on a cluster with GPUs), else 0. CPUs: ``cpus_per_worker``, else the cluster's
    CPUs divided among all workers of the concurrent pre-trainings, but never more than one node
    has — a request no node can satisfy would wait forever."""
    from rsseg.device import gpu_share

    cap = capacity or Capacity.of_ray()
    workers, where = runtime.workers, cap.where
    gpus = gpu_share(device, runtime.gpus_per_worker, cap.gpus, key="pretrain.runtime.gpus_per_worker",
                     who="each pre-training worker", where=where)
    if gpus > cap.node_gpus:
        has = "no node of the Ray cluster has that many (largest:" if where == "the Ray cluster" else f"{where} has ("
        raise ConfigError(f"pretrain.runtime.gpus_per_worker: {gpus:g} GPU per worker, but {has} {cap.node_gpus:g})")
    if gpus > 0 and workers * gpus * concurrent > cap.gpus:  # all workers of all concurrent pre-trainings at once
        fit = int(cap.gpus // gpus)
        during = f" x {concurrent} concurrent pre-trainings" if concurrent > 1 else ""
        raise ConfigError(f"pretrain.runtime.workers: {workers} workers x {gpus:g} GPU{during} need {workers * gpus * concurrent:g} GPUs, "
                          f"{where} has {cap.gpus:g}; use --workers {max(1, fit // concurrent)} (or "
                          f"--set pretrain.runtime.workers={max(1, fit // concurrent)})")
    cpus = runtime.cpus_per_worker
    if cpus is None:
        if cap.cpus < workers * concurrent:
            raise ConfigError(f"pretrain.runtime.workers: {workers} workers need {workers} CPUs, {where} has {cap.cpus:g}")
        cpus = max(1.0, min(cap.node_cpus, float(int(cap.cpus // (workers * concurrent)))))
    elif cpus > cap.node_cpus:
        largest = "the largest node of the Ray cluster" if where == "the Ray cluster" else where
        raise ConfigError(f"pretrain.runtime.cpus_per_worker: {cpus:g} CPUs per worker, but {largest} "
                          f"has {cap.node_cpus:g}")
    return WorkerResources(cpus=float(cpus), gpus=float(gpus))


def local_mode(workers: int, concurrent: int = 1, address: str | None = None) -> bool:
    """Whether a pre-training runs in Ray Train's local mode (its training function in this
    process, no worker actors, no cluster needed): one worker, no other pre-training beside it
    (their threads would share this process), and no cluster to run on — no address (argument or
    RAY_ADDRESS), or Ray already connected to the local cluster this process started."""
    import sys

    if workers != 1 or concurrent != 1:
        return False
    if (address or os.environ.get("RAY_ADDRESS") or "local") != "local":
        return False
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return _local_gcs is not None and ray.get_runtime_context().gcs_address == _local_gcs
    return True


def concurrent_pretrainings(runtime, device: str, todo: int, capacity: Capacity | None = None) -> int:
    """How many pre-trainings of this shape fit at once on ``capacity`` (the Ray cluster's unless
    given; at least 1)."""
    capacity = capacity or Capacity.of_ray()
    per = worker_resources(runtime, device, 1, capacity)
    fit = int(capacity.cpus // (runtime.workers * (runtime.cpus_per_worker or 1.0)))
    if per.gpus:
        fit = min(fit, int(capacity.gpus // (runtime.workers * per.gpus)))
    return max(1, min(todo, fit))
