"""Connecting to Ray: a local cluster by default, an existing one through --address / RAY_ADDRESS.

``ray.init(address="local")`` is explicit: a stale cluster file from an earlier session would
otherwise make ``ray.init(num_cpus=...)`` try to connect to a dead cluster.
"""

from __future__ import annotations

import logging
import os

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
    elif env:
        kwargs["runtime_env"] = {"env_vars": env}
    ray.init(address=address, **kwargs)


def total_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def cpus_per_worker(workers: int, gpu: bool) -> float:
    """Spread the cluster's CPUs over the Train workers (at least one each)."""
    total = total_cpus()
    if total < workers:
        raise ConfigError(f"pretrain.runtime.workers: {workers} workers need {workers} CPUs, the Ray cluster has {total:g}")
    return max(1.0, float(int(total // workers)))
