"""Before a sweep or a pre-training on a Ray cluster of several nodes: every node reaches what the
run needs, or the run does not start.

Nodes of a real cluster (KubeRay pods, cloud VMs) share no filesystem unless someone mounts one.
A SQLite store is then a different file on each node (each trial writes its own, the driver sees
none), and a checkpoint written on one node is not there on another. Both lose results without an
error, hours later. So, before any MLflow run or Ray Train / Tune job:

* a SQLite (or file) tracking URI is refused when the cluster has more than one node;
* a zero-CPU task pinned to each alive node checks that it reaches the tracking server, that it
  sees a marker the driver wrote in the storage and writes one the driver then sees (the same
  directory on both sides, not two folders of the same name), and that it sees the data roots the
  run reads.

Each failure is one line naming the node (address and id) and what it could not reach.
"""

from __future__ import annotations

import os
import uuid
from rsseg import tracking
from rsseg.errors import ConfigError
from rsseg.workdir import Workdir

PROBE_TIMEOUT_S = 60.0
_CHECKED: set[tuple[str, str, tuple[str, ...]]] = set()  # (uri, storage, paths) already checked by this driver


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_tracking_uri(uri: str, n_nodes: int) -> None:
    """A store every node writes to: refused when it is a file on one machine and the cluster has several."""
    if n_nodes > 1 and (tracking.is_sqlite(uri) or uri.startswith("file:")):
        raise ConfigError(
            f"--tracking-uri {uri}: a SQLite store is a file on this machine, and the Ray cluster has {n_nodes} nodes that do "
            "not share it (each node would write its own runs, and this driver would see none); start `platform server` "
            "on the head node and pass --tracking-uri http://<head>:5000 (docs/cluster.md)")


def _storage_fs(storage: str):
    """(pyarrow filesystem, folder) of the storage as passed to a node (a path or an object-storage URI)."""
    from pyarrow import fs

    from rsseg.workdir import filesystem

    if "://" in storage and not storage.startswith("file://"):
        return filesystem(storage)
    return fs.LocalFileSystem(), storage.removeprefix("file://")


def _read(fs, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except OSError:
        return None


def _probe(storage: str, token: str, uri: str, paths: list[tuple[str, str]]) -> tuple[list[str], str | None]:
    """Runs on one node: what it cannot reach, and the marker it wrote in the storage (or None)."""
    import ray

    from rsseg.errors import TrackingError

    problems: list[str] = []
    try:
        tracking.check_reachable(uri, timeout=10)  # a server's /health (a database URI: nothing to probe here)
    except TrackingError as exc:
        problems.append(str(exc))
    wrote = None
    try:
        fs, folder = _storage_fs(storage)
    except Exception as exc:  # noqa: BLE001 - any reason the storage cannot be opened here
        problems.append(f"cannot open the storage {storage} ({str(exc).splitlines()[0]})")
    else:
        marker = f"{folder.rstrip('/')}/.preflight/{token}"
        if _read(fs, marker) != token:
            problems.append(f"cannot see the storage {storage} (the marker {token} this driver wrote there is missing): the "
                            "storage must be one directory every node mounts, or object storage; pass --storage / "
                            "RSSEG_STORAGE (docs/cluster.md)")
        else:
            mine = f"{marker}-{ray.get_runtime_context().get_node_id()}"
            try:
                with fs.open_output_stream(mine) as f:
                    f.write(token.encode())
                wrote = mine
            except OSError as exc:
                problems.append(f"cannot write in the storage {storage} ({str(exc).splitlines()[0]})")
    for label, path in paths:
        if not os.path.exists(path):
            problems.append(f"cannot see the {label} {path}")
    return problems, wrote


def preflight(uri: str, workdir: Workdir, paths: list[tuple[str, str]] = ()) -> None:
    """On a cluster of several nodes (a local or one-node cluster: nothing to check), every node
    reaches the tracking server, the storage and ``paths`` ((label, absolute path) pairs), or a
    `ConfigError` with one line per failure. Once per driver and (uri, storage, paths)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    check_tracking_uri(uri, len(nodes))
    storage = workdir.storage_arg or str(workdir.shared)
    key = (uri, storage, tuple(p for _, p in paths))
    if key in _CHECKED:
        return
    token = uuid.uuid4().hex
    fs, folder = _storage_fs(storage)
    marker = f"{folder.rstrip('/')}/.preflight/{token}"
    fs.create_dir(marker.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(marker) as f:
        f.write(token.encode())
    probe = ray.remote(num_cpus=0)(_probe)
    problems = []
    try:
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            storage, token, uri, list(paths)) for n in nodes]
        for node, ref in zip(nodes, refs):
            where = f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]})"
            try:
                found, wrote = ray.get(ref, timeout=PROBE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                problems.append(f"{where}: did not answer the cluster check within {PROBE_TIMEOUT_S:.0f} s")
                continue
            problems += [f"{where}: {p}" for p in found]
            if wrote is not None and _read(fs, wrote) != token:
                problems.append(f"{where}: wrote {wrote}, which this driver cannot see: {storage} is another directory "
                                "there; pass --storage a path every node mounts (docs/cluster.md)")
    finally:
        from pyarrow import fs as pafs

        for item in fs.get_file_info(pafs.FileSelector(marker.rsplit("/", 1)[0], allow_not_found=True)):
            if item.base_name.startswith(token):
                fs.delete_file(item.path)
    if problems:
        raise ConfigError("\n".join(problems))
    _CHECKED.add(key)


def run_paths(runs, pretrainings=()) -> list[tuple[str, str]]:
    """The folders that ``runs`` (run specs) read from roots the user gave, and the archive imagery
    of ``pretrainings`` (run specs whose pre-training is still to do), as (label, path) pairs, each
    once. Generated synthetic data is made on each node, in its work directory."""
    out: dict[str, str] = {}
    for run in (*runs, *pretrainings):
        if run.data.dataset != "synthetic" and run.data.root is not None:
            out.setdefault(str(run.data.root), "data root")
    for run in pretrainings:
        arch = run.pretrain.archive
        if arch.source_for(run.data) == "folder" and arch.root is not None and run.pretrain.iterations.counts()[0]:
            out.setdefault(str(arch.root), "archive root")
    return [(label, path) for path, label in out.items()]
