"""A cluster whose nodes share no filesystem, on one machine (issue 27): the Ray head has no CPUs,
node 2 runs in its own mount namespace with an empty tmpfs over the driver's work directory, so
every trial and Train worker runs where the driver's files are not. Only the storage (a directory
both see, as NFS would be) and the tracking server (`platform server`) are shared.

`ray.cluster_utils.Cluster` cannot show what is tested here: its nodes share every file."""

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import servers
from conftest import REPO
from rsseg import tracking

SHRINK = [  # the smoke profile shrunk as in test_sweep_e2e: 2 trials, 20 pre-training iterations
    "base.data.synthetic.scenes=3", "base.data.synthetic.size=256", "base.data.synthetic.unlabeled_scenes=1",
    "base.data.synthetic.archive_scenes=1", "base.pretrain.iterations.total=20", "base.pretrain.runtime.checkpoint_every=10",
    "base.ddpm.optim.warmup_iterations=5", "base.finetune.iterations=6", "base.finetune.eval_every=3",
    "base.finetune.val_max_tiles=8", "base.finetune.log_predictions=1",
    "space.seed={grid: [0]}", "space.ddpm.features.timesteps.grid=[[0], [50]]",
]


def _sets(items):
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def cluster():
    why = servers.can_isolate_a_node()
    if why:
        pytest.skip(why)
    base = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    nodes = servers.TwoNodes(base, hidden=base / "w")
    nodes.env |= servers.S3_ENV  # every node's credentials for the object storage, as an instance role would give
    try:
        with servers.s3_server(base / "s3") as endpoint:
            nodes.start()
            with servers.tracking_server(base / "server") as uri:
                nodes.uri, nodes.shared, nodes.s3 = uri, base / "s", endpoint
                nodes.s3_uri = f"s3://rsseg/store?endpoint_override={endpoint}&scheme=http&region=us-east-1"
                yield nodes
    finally:
        nodes.stop()


def platform(c, *args, storage: bool | str = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """The CLI on the driver (this machine's namespace); ``storage``: the shared folder (True),
    none (False: the work directory), or this URI."""
    shared = str(c.shared) if storage is True else storage or None
    cmd = [str(servers.BIN / "platform"), "--workdir", str(c.hidden)] + (["--storage", shared] if shared else []) + list(args)
    return subprocess.run(cmd, env=c.env, capture_output=True, text=True, timeout=timeout, cwd=c.base)


def _runs(uri: str, experiment: str, flt: str = ""):
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=flt, max_results=1000) if exp else []


def test_the_nodes_environment_drops_the_switch_a_local_cluster_leaves_in_this_process(monkeypatch):
    """A test that started a local cluster first (`raycluster.loopback_only`) leaves Ray's
    single-machine switch in os.environ; the two nodes must not inherit it, or the head makes a
    cluster node 2 cannot join (the cluster tests then fail only in that order)."""
    import ray._private.ray_constants as constants

    from rsseg import raycluster

    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", constants.ENABLE_RAY_CLUSTER)
    monkeypatch.delenv(constants.ENABLE_RAY_CLUSTERS_ENV_VAR, raising=False)
    raycluster.loopback_only()
    assert os.environ[constants.ENABLE_RAY_CLUSTERS_ENV_VAR] == "0"  # the precondition: this process has it
    env = servers.TwoNodes(Path("/nonexistent"), hidden=Path("/nonexistent/w")).env
    assert constants.ENABLE_RAY_CLUSTERS_ENV_VAR not in env and env["RAY_AUTH_MODE"] == "token"


@pytest.mark.slow
def test_sweep_pretraining_tables_and_predict_with_only_the_storage_shared(cluster, tmp_path):
    """(a) storage = a directory both nodes see: the sweep's trials and the pre-training run on
    node 2; every run, metric, model and checkpoint reaches the driver's server and storage; the
    tables and a prediction from the best model then work on the driver."""
    t0 = time.time()
    r = platform(cluster, "sweep", str(REPO / "sweeps" / "noise_ablation.yaml"), "--profile", "smoke", *_sets(SHRINK),
                 "--address", cluster.address, "--tracking-uri", cluster.uri)
    sweep_s = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 finished, 0 failed, 2 trials" in r.stdout and "View run" not in r.stdout
    kids = _runs(cluster.uri, "noise_ablation", "tags.kind = 'finetune'")
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    assert {k.data.tags["node_id"] for k in kids} == {cluster.node2_id}  # run where the driver's files are not
    for k in kids:
        assert "test/mIoU" in k.data.metrics and "val/mIoU" in k.data.metrics
        assert (cluster.shared / "models" / k.info.run_id / "model.pt").is_file()
        assert "model/model.pt" in {a.path for a in tracking.client(cluster.uri).list_artifacts(k.info.run_id, "model")}
    (pre,) = _runs(cluster.uri, tracking.PRETRAIN_EXPERIMENT)
    assert pre.info.status == "FINISHED"
    done = list((cluster.shared / "checkpoints" / "pretrain").glob("ddpm-*/DONE.json"))
    assert len(done) == 1 and (done[0].parent / "final.pt").is_file()
    assert not (cluster.hidden / "checkpoints").exists() and not (cluster.hidden / "models").exists()
    assert not list((cluster.shared / ".preflight").glob("*"))  # the check's markers are cleaned up

    t0 = time.time()
    r = platform(cluster, "pretrain", str(REPO / "sweeps" / "pretrain.yaml"), "--profile", "smoke", "--workers", "2",
                 *_sets([s.removeprefix("base.") for s in SHRINK[:8]] + ["pretrain.seed=1"]), "--address", cluster.address, "--tracking-uri", cluster.uri)
    pretrain_s = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finished: fingerprint" in r.stdout, r.stdout  # trained now, not found
    runs = [p for p in _runs(cluster.uri, tracking.PRETRAIN_EXPERIMENT) if p.info.run_id != pre.info.run_id]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["workers"] == "2"
    ranks = dict(kv.split("=") for kv in runs[0].data.tags["worker_nodes"].split(","))
    assert set(ranks) == {"rank0", "rank1"} and set(ranks.values()) == {cluster.node2_id}
    fp = runs[0].data.tags["pretrain_fingerprint"]
    assert (cluster.shared / "checkpoints" / "pretrain" / f"ddpm-{fp}" / "DONE.json").is_file()

    r = platform(cluster, "tables", "--tracking-uri", cluster.uri, "--out", str(tmp_path / "tables"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "t = [50]" in (tmp_path / "tables" / "table2.md").read_text()
    r = platform(cluster, "predict", "best:noise_ablation", "dataset:0", "--out", str(tmp_path / "maps"), "--tracking-uri", cluster.uri)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list((tmp_path / "maps").glob("*.tif"))
    print(f"two-node sweep: 2 trials in {sweep_s:.0f} s; 2-worker pre-training in {pretrain_s:.0f} s")
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    (REPO / "test-artifacts" / "cluster.json").write_text(json.dumps({"sweep_s": sweep_s, "pretrain_s": pretrain_s}))


@pytest.mark.slow
def test_what_a_node_cannot_reach_is_one_line_before_any_run(cluster):
    """(d) SQLite with a cluster; the storage or a data root node 2 cannot see: one line each,
    exit 2, naming the node, and no MLflow run is opened."""
    before = len(_runs(cluster.uri, "noise_ablation"))
    sweep = ["sweep", str(REPO / "sweeps" / "noise_ablation.yaml"), "--profile", "smoke", *_sets(SHRINK), "--address", cluster.address]

    r = platform(cluster, *sweep)  # the work directory's SQLite store
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "a SQLite store is a file on this machine, and the Ray cluster has 2 nodes" in r.stderr and "platform server" in r.stderr

    r = platform(cluster, *sweep, "--tracking-uri", cluster.uri, storage=False)  # storage = the work directory, hidden on node 2
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"({cluster.node2_id[:8]}): cannot see the storage {cluster.hidden}" in r.stderr and "--storage" in r.stderr
    assert len(_runs(cluster.uri, "noise_ablation")) == before

    own = cluster.hidden / "own"  # a data root on the driver only
    own.mkdir(exist_ok=True)
    probe = ("import ray, sys; from rsseg import clustercheck; from rsseg.workdir import Workdir; ray.init(address=sys.argv[1], "
             "logging_level='ERROR'); wd = Workdir.resolve(sys.argv[2], sys.argv[3])\n"
             "try:\n clustercheck.preflight(sys.argv[4], wd, [('data root', sys.argv[5])])\n"
             "except Exception as e:\n print(type(e).__name__, e)")
    r = subprocess.run([servers.sys.executable, "-c", probe, cluster.address, str(cluster.hidden), str(cluster.shared), cluster.uri, str(own)],
                       env=cluster.env, capture_output=True, text=True, timeout=300)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ConfigError node "), r.stdout + r.stderr[-2000:]
    assert f"({cluster.node2_id[:8]}): cannot see the data root {own}" in lines[0]

    dead = f"http://127.0.0.1:{servers.free_port()}"  # no tracking server there: every node says so
    r = subprocess.run([servers.sys.executable, "-c", probe, cluster.address, str(cluster.hidden), str(cluster.shared), dead, str(cluster.shared)],
                       env=cluster.env, capture_output=True, text=True, timeout=300)
    out = r.stdout.strip()
    assert out.startswith("ConfigError node ") and f"({cluster.node2_id[:8]}): MLflow tracking server {dead} is unreachable" in out, out


@pytest.mark.slow
def test_the_same_with_object_storage(cluster, tmp_path):
    """(b) storage = s3:// on an S3-compatible server (moto) on 127.0.0.1: the same sweep, a
    2-worker pre-training, tables and a prediction; checkpoints and models land in the bucket,
    nothing in the driver's storage folder of (a), and the driver reads them through its mirror."""
    from pyarrow import fs

    bucket = servers.s3(cluster.s3)
    t0 = time.time()
    r = platform(cluster, "sweep", str(REPO / "sweeps" / "noise_ablation.yaml"), "--profile", "smoke", *_sets(SHRINK),
                 "--address", cluster.address, "--tracking-uri", cluster.uri, storage=cluster.s3_uri)
    sweep_s = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 finished, 0 failed, 2 trials" in r.stdout
    parent = r.stdout.split("parent run ")[1].split()[0]
    kids = _runs(cluster.uri, "noise_ablation", f"tags.kind = 'finetune' and tags.sweep_parent = '{parent}'")
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    assert {k.data.tags["node_id"] for k in kids} == {cluster.node2_id}
    objects = {i.path for i in bucket.get_file_info(fs.FileSelector("rsseg/store", recursive=True)) if i.type == fs.FileType.File}
    done = [o for o in objects if o.startswith("rsseg/store/checkpoints/pretrain/ddpm-") and o.endswith("/DONE.json")]
    assert len(done) == 1 and done[0].replace("DONE.json", "final.pt") in objects
    for k in kids:
        assert f"rsseg/store/models/{k.info.run_id}/model.pt" in objects
    assert any(o.startswith("rsseg/store/ray/sweeps/noise_ablation-") for o in objects)  # Tune's storage
    assert any(o.startswith("rsseg/store/ray/pretrain-ddpm-") for o in objects)  # Train's storage
    assert not any(k.info.run_id in str(p) for p in cluster.shared.rglob("*") for k in kids)  # not in (a)'s folder

    t0 = time.time()
    r = platform(cluster, "pretrain", str(REPO / "sweeps" / "pretrain.yaml"), "--profile", "smoke", "--workers", "2",
                 *_sets([s.removeprefix("base.") for s in SHRINK[:8]] + ["pretrain.seed=2"]), "--address", cluster.address,
                 "--tracking-uri", cluster.uri, storage=cluster.s3_uri)
    pretrain_s = time.time() - t0
    assert r.returncode == 0 and "finished: fingerprint" in r.stdout, r.stderr[-3000:]
    fp = r.stdout.split("finished: fingerprint ")[1].split()[0]
    assert bucket.get_file_info(f"rsseg/store/checkpoints/pretrain/ddpm-{fp}/DONE.json").type == fs.FileType.File

    mirror = cluster.hidden / "storage" / "models" / kids[0].info.run_id
    r = platform(cluster, "predict", f"runs:/{kids[0].info.run_id}", "dataset:0", "--out", str(tmp_path / "maps"),
                 "--tracking-uri", cluster.uri, storage=cluster.s3_uri)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list((tmp_path / "maps").glob("*.tif")) and (mirror / "model.pt").is_file()  # read through the driver's mirror
    print(f"object storage: 2 trials in {sweep_s:.0f} s; 2-worker pre-training in {pretrain_s:.0f} s; {len(objects)} objects")
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    (REPO / "test-artifacts" / "cluster-s3.json").write_text(json.dumps({"sweep_s": sweep_s, "pretrain_s": pretrain_s,
                                                                          "objects": len(objects)}))


TEAM_RUN = """
name: team
method: ddpm
data: {tile_size: 32, synthetic: {scenes: 3, size: 128, unlabeled_scenes: 1, archive_scenes: 1}}
ddpm: {unet: {preset: tiny}, features: {weights: random, timesteps: [0, 50]}}
finetune: {iterations: 6, eval_every: 3, batch_size: 4, eval_batch_size: 16, log_predictions: 0, threads: 1}
"""


@pytest.mark.slow
def test_team_server_on_postgresql_holds_the_runs(tmp_path):
    """(c) `platform server --backend-store-uri postgresql://...` on a real PostgreSQL (Debian's
    package, initdb / pg_ctl in a temporary directory): a fine-tuning run through it lands in the
    database, its model in the server's artifacts destination; the password never printed."""
    why = servers.postgres_missing()
    if why:
        pytest.skip(why)
    spec = tmp_path / "team.yaml"
    spec.write_text(TEAM_RUN)
    with servers.postgres() as db, servers.tracking_server(tmp_path / "srv", "--backend-store-uri", db,
                                                           "--artifacts-destination", str(tmp_path / "team-artifacts")) as uri:
        r = subprocess.run([str(servers.BIN / "platform"), "--workdir", str(tmp_path / "w"), "finetune", str(spec), "--tracking-uri", uri],
                           env=servers.clean_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = servers.psql(db, "SELECT r.run_uuid, r.status, e.name FROM runs r JOIN experiments e USING (experiment_id)")
        assert [(status, exp) for _, status, exp in rows] == [("FINISHED", tracking.FINETUNE_EXPERIMENT)]
        metrics = {k for (k,) in servers.psql(db, f"SELECT DISTINCT key FROM metrics WHERE run_uuid = '{rows[0][0]}'")}
        assert {"test/mIoU", "val/mIoU"} <= metrics
        assert list((tmp_path / "team-artifacts").rglob("model/model.pt"))  # proxied by the server, not written by the run
    log = (tmp_path / "srv-server.log").read_text()
    assert f"backend {db}" in log and "artifacts file://" in log
