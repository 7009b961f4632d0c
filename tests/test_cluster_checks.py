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


def test_without_storage_the_layout_is_the_work_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("RSSEG_STORAGE", raising=False)
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
    ("--storage", "gs://bucket/s", r"--storage gs://bucket/s: gs:// object storage is not supported yet; mount it on every node"),
])
def test_a_uri_is_not_silently_a_local_folder(option, value, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        Workdir.resolve(value if option == "--workdir" else tmp_path, value if option == "--storage" else None)
    assert not list(tmp_path.glob("s3:*")) and not Path("s3:").exists()
    r = subprocess.run([str(servers.BIN / "platform"), option, value, "data", "info"], capture_output=True, text=True,
                       env=servers.clean_env(), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {option} {value}: "), r.stderr
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "gs:").exists()


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
    from rsseg.sweep.driver import lost_trials

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
