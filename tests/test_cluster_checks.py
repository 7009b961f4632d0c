"""The cluster's rules without a cluster: work directory vs storage, the SQLite refusal, the
errors no retry fixes, results Tune ran that the store does not hold, `platform server`'s
arguments. The two-node tests are in test_cluster.py."""

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import servers
from rsseg.errors import ConfigError
from rsseg.workdir import Workdir


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch, tmp_path):
    """Workdir.export() writes RSSEG_WORKDIR / RSSEG_STORAGE: recorded here first, so that the
    test's values are undone after it (a leaked s3:// storage sends later tests to a dead server)."""
    monkeypatch.setenv("RSSEG_WORKDIR", str(tmp_path / "default-work"))
    monkeypatch.setenv("RSSEG_STORAGE", "")  # (delenv of an absent variable records nothing to undo)
    monkeypatch.delenv("RSSEG_STORAGE")


def test_without_storage_the_layout_is_the_work_directory(tmp_path):
    wd = Workdir.resolve(tmp_path / "w")
    assert wd.storage is None and wd.shared == wd.root
    for p in (wd.checkpoints, wd.ray_storage, wd.sweeps, wd.models, wd.cache, wd.data, wd.ray_local):
        assert p.parent == wd.root, p


def test_with_storage_what_nodes_share_moves_and_scratch_stays(tmp_path, monkeypatch):
    monkeypatch.setenv("RSSEG_STORAGE", str(tmp_path / "nfs"))
    wd = Workdir.resolve(tmp_path / "w")
    assert wd.storage == tmp_path / "nfs"
    assert {p.parent for p in (wd.checkpoints, wd.ray_storage, wd.sweeps, wd.models)} == {tmp_path / "nfs"}
    assert {p.parent for p in (wd.cache, wd.data, wd.indexes, wd.ray_local, wd.mlflow_db)} == {wd.root}
    wd.export()
    assert Workdir.resolve() == wd  # a subprocess resolves the same pair
    assert Workdir.at(str(wd.root), str(wd.storage)) == wd and Workdir.at(str(wd.root), None).storage is None
    assert Workdir.resolve(tmp_path / "w", tmp_path / "w").storage is None  # the storage is the work directory itself


@pytest.mark.parametrize("option, value, message", [
    ("--workdir", "s3://bucket/w", r"--workdir s3://bucket/w: the work directory is a local path on each node, not a s3:// URI"),
    ("--storage", "ftp://host/s", r"--storage ftp://host/s: not a storage URI pyarrow can open \(.*ftp"),
])
def test_a_uri_is_not_silently_a_local_folder(option, value, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        Workdir.resolve(value if option == "--workdir" else tmp_path, value if option == "--storage" else None)
    assert not list(tmp_path.glob("s3:*")) and not Path("s3:").exists()
    r = subprocess.run([str(servers.BIN / "platform"), option, value, "data", "info"], capture_output=True, text=True,
                       env=servers.clean_env(), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {option} {value}: "), r.stderr
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "ftp:").exists()


def test_object_storage_is_mirrored_in_the_work_directory(tmp_path):
    uri = "s3://bucket/prefix?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    wd = Workdir.resolve(tmp_path / "w", uri)
    assert (wd.remote, wd.storage, wd.shared, wd.storage_arg) == (uri, None, wd.root / "storage", uri)
    assert wd.checkpoints == wd.root / "storage" / "checkpoints" and wd.cache == wd.root / "cache"
    wd.export()
    assert Workdir.resolve() == wd == Workdir.at(str(wd.root), uri)


def test_file_uri_storage_is_its_path(tmp_path):
    assert Workdir.resolve(tmp_path / "w", f"file://{tmp_path}/nfs").storage == tmp_path / "nfs"


def test_sqlite_is_refused_on_several_nodes_only():
    from rsseg.clustercheck import check_tracking_uri

    check_tracking_uri("sqlite:////w/mlflow.db", 1)  # one machine: fine
    check_tracking_uri("http://head:5000", 3)
    check_tracking_uri("postgresql://u@db/mlflow", 3)  # every node reaches a database server
    with pytest.raises(ConfigError, match=r"--tracking-uri sqlite:////w/mlflow.db: a SQLite store is a file on this machine, "
                                          r"and the Ray cluster has 2 nodes .* start `platform server` on the head node"):
        check_tracking_uri("sqlite:////w/mlflow.db", 2)


def test_errors_that_fail_every_retry_on_a_cluster_are_not_retried():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from rsseg.errors import is_fatal

    missing = MlflowException("Run with id=dbc4 not found", error_code=RESOURCE_DOES_NOT_EXIST)
    assert is_fatal(missing)
    try:
        try:
            raise missing
        except MlflowException as e:
            raise RuntimeError("Training failed due to worker errors") from e
    except RuntimeError as wrapped:
        assert is_fatal(wrapped)
    # as text only, across Ray's process boundary
    assert is_fatal(RuntimeError("Traceback ...\nmlflow.exceptions.MlflowException: Run with id=dbc4 not found"))
    assert is_fatal(RuntimeError("Unable to set up cluster storage with the following settings:\nStorageContext<...>"))
    # negative controls: another missing resource, a transient failure
    assert not is_fatal(MlflowException("Experiment 'x' does not exist", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_fatal(RuntimeError("connection reset by peer"))


@dataclass
class FakeResult:  # what the driver reads of a Tune Result
    config: dict
    metrics: dict = field(default_factory=dict)
    error: BaseException | None = None
    path: str = "/ray/sweeps/x/trial"


def test_trials_tune_ran_that_the_store_does_not_hold_are_named():
    from rsseg.sweep.record import lost_trials

    grid = [FakeResult({"cell": {"slot": "0.0"}}, {"trial_id": "a"}),
            FakeResult({"cell": {"slot": "1.0"}}, {"trial_id": "b"}),
            FakeResult({"cell": {"slot": "2.0"}}, {}, RuntimeError("x\nCheckpointError: pre-training 7aae is not in the store")),
            FakeResult({"cell": {"index": 3}}, {"trial_id": "d"}),
            FakeResult({}, {}, KeyError("cell"))]  # a trial a restored searcher made up: not one of the plan's
    held = [{"trial_id": "a", "slot": "0.0"}, {"trial_id": None, "slot": "3:d"}]
    assert lost_trials([grid], held) == ["trial 1.0", "trial 2.0 failed: CheckpointError: pre-training 7aae is not in the store"]
    assert lost_trials([grid[:1]], held) == []  # negative control: everything held


def test_server_backend_must_be_a_database(tmp_path):
    from rsseg.server import backend_uri, masked

    wd = Workdir.resolve(tmp_path / "w")
    assert backend_uri(None, wd) == f"sqlite:///{wd.mlflow_db}"
    assert backend_uri("postgresql://rsseg@db:5432/mlflow", wd) == "postgresql://rsseg@db:5432/mlflow"
    assert backend_uri(str(tmp_path / "team.db"), wd) == f"sqlite:///{tmp_path / 'team.db'}"
    with pytest.raises(ConfigError, match=r"--backend-store-uri http://head:5000: expected a database"):
        backend_uri("http://head:5000", wd)
    assert masked("postgresql://rsseg:s3cret@db/mlflow") == "postgresql://rsseg:***@db/mlflow"


def test_object_storage_round_trip_between_two_nodes_mirrors(tmp_path, monkeypatch):
    """What one node writes (a checkpoint, a finished pre-training, a model) another reads through
    its own mirror, on a real S3-compatible server; a mounted storage needs none of it."""
    import torch

    from rsseg import storage
    from rsseg.checkpoints import store

    for k, v in servers.S3_ENV.items():
        monkeypatch.setenv(k, v)
    with servers.s3_server(tmp_path / "s3") as endpoint:
        uri = f"s3://rsseg/p?endpoint_override={endpoint}&scheme=http&region=us-east-1"
        a, b = Workdir.resolve(tmp_path / "a", uri), Workdir.resolve(tmp_path / "b", uri)
        a.export()
        sdir = store.StoreDir(a.checkpoints / "pretrain" / "ddpm-0123456789abcdef")
        for step in (10, 15):
            store.save(sdir.ckpt / f"step_{step:08d}.pt", {"step": step, "w": torch.ones(3)}, "0123456789abcdef", step)
        store.finalize(sdir, {"step": 20, "model": {"w": torch.ones(2)}, "method": "ddpm"}, "run-1")
        (a.models / "r1").mkdir(parents=True)
        (a.models / "r1" / "model.json").write_text("{}")
        storage.push(a.models / "r1")
        store.write_imported(a, "w1", "ddpm", {"model": {"w": torch.zeros(2)}}, {"sha256": "ab" * 32, "path": "/x/w1.pth"})

        b.export()  # another node: an empty mirror
        sdir_b = store.StoreDir(b.checkpoints / "pretrain" / "ddpm-0123456789abcdef")
        assert not sdir_b.root.exists()
        assert [s for s, _ in store.checkpoints(sdir_b)] == [10, 15]
        assert store.load(sdir_b.ckpt / "step_00000010.pt", "0123456789abcdef")["step"] == 10
        assert store.validate(sdir_b.final)["step"] == 20 and store.done_run_id(sdir_b) == "run-1"
        assert store.imported_fingerprint(b, "w1") == "import-" + "ab" * 8  # weights imported on another machine
        assert store.find_imported(b, "w1").load()["method"] == "ddpm" and [d["name"] for d in store.list_imported(b)] == ["w1"]
        storage.pull(b.models, pattern="*/model.json")
        assert (b.models / "r1" / "model.json").read_text() == "{}"
        a.export()
        store.prune(sdir, keep=1)  # pruned on one node: gone from the storage too
        b.export()
        import shutil

        shutil.rmtree(sdir_b.ckpt)
        assert [s for s, _ in store.checkpoints(sdir_b)] == [15]
    # negative control: a mounted storage is the mirror itself, nothing to push or pull
    Workdir.resolve(tmp_path / "c", tmp_path / "nfs").export()
    assert storage._remote_of(tmp_path / "nfs" / "checkpoints") is None

