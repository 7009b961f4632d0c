"""Connecting to Ray: a local cluster by default, an existing one through --address / RAY_ADDRESS.

``ray.init(address="local")`` is explicit: a stale cluster file from an earlier session would
otherwise make ``ray.init(num_cpus=...)`` try to connect to a dead cluster.

A local cluster listens on the loopback interface only (Ray binds its GCS, raylet and agents to
the node's address, by default the machine's external one and 0.0.0.0; its single-machine switch
``ENABLE_RAY_CLUSTER`` makes that 127.0.0.1), and keeps its session files under the work
directory (``<workdir>/ray/tmp``) when the path leaves room for Ray's Unix sockets.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from rsseg.errors import ConfigError


def init(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict = dict(
        logging_level=logging.WARNING,
        # Worker output stays in Ray's session logs unless asked for: the CLI shows progress.
        log_to_driver=os.environ.get("RSSEG_RAY_LOGS", "0") == "1",
    )
    env = {k: os.environ[k] for k in ("RSSEG_WORKDIR", "MLFLOW_TRACKING_URI", "GDAL_CACHEMAX") if k in os.environ}
    if address == "local":
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        loopback_only()
        temp = local_temp_dir()
        if temp is not None:
            kwargs["_temp_dir"] = str(temp)
    elif env:
        kwargs["runtime_env"] = {"env_vars": env}
    ray.init(address=address, **kwargs)


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

    temp = Workdir.resolve().ray_storage / "tmp"
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


def worker_resources(runtime, device: str, concurrent: int = 1) -> WorkerResources:
    """Per-worker CPUs and GPUs of a pre-training, ``concurrent`` of which share the cluster.

    GPUs: ``pretrain.runtime.gpus_per_worker``, else 1 when the device policy says CUDA (``cuda``,
    or ``auto`` on a cluster with GPUs), else 0. CPUs: ``cpus_per_worker``, else the cluster's
    CPUs divided among all workers of the concurrent pre-trainings, but never more than one node
    has — a request no node can satisfy would wait forever."""
    workers = runtime.workers
    cluster_gpus, cluster_cpus, node_cpus = total_gpus(), total_cpus(), largest_node("CPU")
    if device == "cuda" and cluster_gpus == 0:
        raise ConfigError("runtime.device: cuda, but the Ray cluster has no GPU for the pre-training workers")
    gpus = runtime.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if (device == "cuda" or (device == "auto" and cluster_gpus > 0)) else 0.0
    if gpus > largest_node("GPU"):
        raise ConfigError(f"pretrain.runtime.gpus_per_worker: {gpus:g} GPU per worker, but no node of the Ray cluster has that many "
                          f"(largest: {largest_node('GPU'):g})")
    if device == "cpu" and gpus > 0:
        raise ConfigError(f"runtime.device: cpu, but pretrain.runtime.gpus_per_worker is {gpus:g}")
    cpus = runtime.cpus_per_worker
    if cpus is None:
        if cluster_cpus < workers * concurrent:
            raise ConfigError(f"pretrain.runtime.workers: {workers} workers need {workers} CPUs, the Ray cluster has {cluster_cpus:g}")
        cpus = max(1.0, min(node_cpus, float(int(cluster_cpus // (workers * concurrent)))))
    elif cpus > node_cpus:
        raise ConfigError(f"pretrain.runtime.cpus_per_worker: {cpus:g} CPUs per worker, but the largest node of the Ray cluster "
                          f"has {node_cpus:g}")
    return WorkerResources(cpus=float(cpus), gpus=float(gpus))


def concurrent_pretrainings(runtime, device: str, todo: int) -> int:
    """How many pre-trainings of this shape fit on the cluster at once (at least 1)."""
    per = worker_resources(runtime, device, 1)
    fit = int(total_cpus() // (runtime.workers * (runtime.cpus_per_worker or 1.0)))
    if per.gpus:
        fit = min(fit, int(total_gpus() // (runtime.workers * per.gpus)))
    return max(1, min(todo, fit))
