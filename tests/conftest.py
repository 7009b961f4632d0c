"""Shared fixtures: an isolated work directory, small synthetic data, dataset fixtures."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RGB_BYTE = SHARED / "data" / "RGB.byte.tif"
if not RGB_BYTE.exists():  # fall back to the copy kept with the tests
    RGB_BYTE = Path(__file__).parent / "data" / "RGB.byte.tif"

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the smoke profile's CPU kernel path (runtime.cpu_kernels: avx2) for the whole session: tests run
# smoke specs in this process, whose kernels are chosen at its first CPU operation
from rsseg.kernels import PINNED  # noqa: E402 - torch-free

for _key, _value in PINNED["avx2"].items():
    os.environ.setdefault(_key, _value)
# the MLflow store template (rsseg.tracking.template_path) of this session, not the user's
os.environ.setdefault("RSSEG_CACHE_DIR", tempfile.mkdtemp(prefix="rsseg-test-cache-"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    from rsseg.workdir import Workdir

    wd = tmp_path / "work"
    monkeypatch.setenv("RSSEG_WORKDIR", str(wd))
    return Workdir.resolve(wd).ensure()


@pytest.fixture(scope="session")
def session_workdir(tmp_path_factory):
    from rsseg.workdir import Workdir

    return Workdir.resolve(tmp_path_factory.mktemp("session-work")).ensure()


def small_synthetic(**kw):
    """A DataSpec for tiny synthetic scenes (3 x 128 px, 32 px tiles) unless overridden."""
    from rsseg.config.specs import DataSpec, SyntheticSpec

    syn = dict(scenes=3, size=128, unlabeled_scenes=1, archive_scenes=1, seed=0)
    syn.update(kw.pop("synthetic", {}))
    return DataSpec(dataset="synthetic", tile_size=kw.pop("tile_size", 32), synthetic=SyntheticSpec(**syn), **kw)


@pytest.fixture
def tracking_server(tmp_path):
    """A `platform server` (SQLite behind it) for a test on a cluster of several nodes, where a
    SQLite tracking URI is refused; its URI."""
    import servers

    with servers.tracking_server(tmp_path / "server") as uri:
        yield uri


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with 2 CPUs for a module's tests (started if none is running)."""
    import ray

    from rsseg import raycluster

    if not ray.is_initialized():
        raycluster.init(num_cpus=2)
    yield ray


@contextlib.contextmanager
def two_node_cluster():
    """A Ray cluster of a 0-CPU head and two 1-CPU nodes, this process its driver: what spreading
    work over nodes needs (each node takes one 1-CPU task). Yields (cluster, nodes); shut down after."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def install_plugin(root, monkeypatch, module: str, source: str, group: str, entry: str) -> None:
    """A package installed beside the platform, as pip would leave it: ``<module>.py`` holding
    ``source`` and a dist-info declaring ``entry`` ("name = module:attr") in the entry-point
    ``group``, both on sys.path for this test."""
    import importlib

    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()


def tiny_run(**overrides):
    """A run spec for CPU tests: tiny UNet, tiny synthetic data (32 px tiles), 2 workers."""
    from rsseg.config.loader import merge
    from rsseg.runspec import RunSpec

    base = {
        "data": {"tile_size": 32, "synthetic": {"scenes": 3, "size": 128, "unlabeled_scenes": 1, "archive_scenes": 1}},
        "ddpm": {"unet": {"preset": "tiny"}, "optim": {"lr": 1e-3, "warmup_start_lr": 1e-4, "warmup_iterations": 4},
                 "features": {"timesteps": [0, 50]}},
        "pretrain": {"iterations": {"archive": 12, "homogeneous": 12}, "batch_size": 4,
                     "runtime": {"workers": 2, "checkpoint_every": 4, "log_every": 4, "samples": 2, "sample_steps": 4}},
        "finetune": {"iterations": 20, "batch_size": 4, "eval_every": 10, "eval_batch_size": 16, "log_predictions": 1,
                     },
    }
    return RunSpec(**merge(base, overrides))


@pytest.fixture(scope="session")
def synthetic_tiles(tmp_path_factory):
    """(32, 3, 32, 32) training tiles of tiny_run's synthetic data, for the pre-training objectives' learning tests."""
    import torch

    from rsseg.data import tiles
    from rsseg.data.dataset import TileDataset, TileReader
    from rsseg.workdir import Workdir

    wd = Workdir.resolve(tmp_path_factory.mktemp("tiles")).ensure()
    index = tiles.build(tiny_run().data, wd)
    s = index.scenes
    ds = TileDataset(TileReader(s.scenes, s.table, s.bands, s.value_range), index.split("train"))
    return torch.stack([ds[i]["image"] for i in range(min(32, len(ds)))])


def train_objective(obj, tiles, steps: int) -> list[tuple[float, dict]]:
    """``steps`` AdamW steps (MAE's betas / weight decay, lr 1e-3) of a pre-training objective on
    batches of 8 of ``tiles``, seeded: each step's (loss, logged terms)."""
    import torch

    opt = torch.optim.AdamW(obj.network.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, tiles.shape[0], (8,), generator=gen)
        loss, logs = obj.loss(obj.network, tiles[idx], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append((loss.item(), logs))
    return out


# One worker (the small profile's, stated here too: the fingerprint ignores the worker count). (A 600-iteration recipe at lr 1.5e-3 was
# tried to halve this fixture's ~5 min: 67.6 % once, 57.2 % the next time, too close to the
# bound below, so the test uses the profile's 1 200 iterations: 79 %.)
SMOKE_PRETRAIN = ["pretrain.runtime.workers=1"]


@pytest.fixture(scope="session")
def smoke_pretrained(tmp_path_factory):
    """The smoke profile's DDPM pre-training (sweeps/finetune.yaml --profile smoke), once per
    session: 1 200 iterations of the tiny UNet."""
    import ray

    from rsseg import raycluster
    from rsseg.pretrain.ensure import ensure_pretrained
    from rsseg.runspec import load_run
    from rsseg.workdir import Workdir

    wd = Workdir.resolve(tmp_path_factory.mktemp("smoke")).ensure()
    run = load_run(REPO / "sweeps" / "finetune.yaml", "smoke", SMOKE_PRETRAIN).spec
    if not ray.is_initialized():
        raycluster.init(num_cpus=2)
    return wd, run, ensure_pretrained(run, wd)


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A directory on a full file system: a real 1 MB tmpfs filled up where this machine lets us
    mount one (root), else the same ENOSPC injected into file writes under it."""
    import errno
    import builtins
    import subprocess

    d = tmp_path / "full"
    d.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                                                   capture_output=True).returncode == 0
    if mounted:
        with open(d / "filler", "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
    else:
        real_open = builtins.open

        def full_open(file, mode="r", *a, **k):
            if any(c in mode for c in "wax+") and str(file).startswith(str(d)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            return real_open(file, mode, *a, **k)

        real_os_open = os.open

        def full_os_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and str(path).startswith(str(d)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real_os_open(path, flags, *a, **k)

        monkeypatch.setattr(builtins, "open", full_open)
        monkeypatch.setattr(os, "open", full_os_open)
    yield d
    if mounted:
        subprocess.run(["umount", str(d)], capture_output=True)
