"""Start-up of a CLI stage (issue 18): the MLflow store template, imports warmed while Ray starts,
the lean local cluster. The timings themselves are in bench/startup.py, not here."""

from __future__ import annotations

import os
import sqlite3
import sys

import pytest

from rsseg import raycluster, tracking
from rsseg.tracking import template


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSSEG_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def migrations(monkeypatch):
    """Counts MLflow's schema creations (the slow path a template avoids)."""
    import mlflow.store.db.utils as db_utils

    calls = []
    real = db_utils._initialize_tables
    monkeypatch.setattr(db_utils, "_initialize_tables", lambda engine: (calls.append(str(engine.url)), real(engine))[1])
    return calls


def _uri(path) -> str:
    return f"sqlite:///{path}"


def _usable(uri: str) -> None:
    c = tracking.client(uri)
    exp = c.create_experiment("x")
    run = c.create_run(exp)
    c.log_metric(run.info.run_id, "m", 0.5)
    c.set_terminated(run.info.run_id)
    assert c.get_run(run.info.run_id).data.metrics == {"m": 0.5}
    assert c.get_experiment("0").artifact_location == f"{tracking.PROXIED}/0"


def test_a_fresh_store_is_copied_from_the_template_and_mlflow_uses_it(tmp_path, cache, migrations):
    first, second = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    tracking.init_store(_uri(first))
    assert tracking.template_path().is_file() and tracking.template_path().parent == cache
    tracking.init_store(_uri(second))
    assert len(migrations) == 1 and migrations[0].endswith("a/mlflow.db")  # the second store replayed no migration
    _usable(_uri(second))
    _usable(_uri(first))  # and the two are independent stores
    assert [e.name for e in tracking.client(_uri(second)).search_experiments()] == ["x", "Default"]


@pytest.mark.parametrize("bad", ["not a database", "an older schema"])
def test_a_template_that_is_not_an_empty_store_at_the_schema_head_is_replaced(tmp_path, cache, migrations, bad):
    cache.mkdir()
    if bad == "not a database":
        tracking.template_path().write_bytes(b"not a database")
    else:
        tracking.init_store(_uri(tmp_path / "old" / "mlflow.db"))
        with sqlite3.connect(tracking.template_path()) as con:
            con.execute("UPDATE alembic_version SET version_num = '0a8213491aaa'")  # MLflow 1.x's first revision
        migrations.clear()
    store = tmp_path / "c" / "mlflow.db"
    tracking.init_store(_uri(store))
    assert len(migrations) == 1  # created, not copied
    _usable(_uri(store))
    with sqlite3.connect(tracking.template_path()) as con:  # the template is now a good one
        assert con.execute("SELECT COUNT(*) FROM alembic_version").fetchone()[0] == 1
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


def test_a_store_that_already_holds_runs_is_neither_replaced_nor_kept_as_the_template(tmp_path, cache):
    store = tmp_path / "d" / "mlflow.db"
    tracking.init_store(_uri(store))
    _usable(_uri(store))
    tracking.template_path().unlink()
    template.save_from(store)  # what a second first-time init of a used store would try
    assert not tracking.template_path().exists()
    tracking._INITIALISED.discard(_uri(store))
    tracking.init_store(_uri(store))  # an existing store is opened, not overwritten by a template
    assert len(tracking.client(_uri(store)).search_runs([tracking.client(_uri(store)).get_experiment_by_name("x").experiment_id])) == 1


def test_warm_imports_happen_in_the_background_and_a_failing_one_is_left_to_the_caller():
    for name in ("xml.dom.minidom", "no_such_module_rsseg"):
        sys.modules.pop(name, None)
    raycluster._warm(("no_such_module_rsseg", "xml.dom.minidom")).join()
    assert "xml.dom.minidom" in sys.modules and "no_such_module_rsseg" not in sys.modules


def test_the_local_cluster_starts_without_dashboard_or_preemption_watcher_and_user_settings_win(ray_cluster):
    import psutil

    cmdlines = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmdlines.append(" ".join(p.cmdline()))
        except psutil.Error:
            continue
    assert any("raylet" in c for c in cmdlines), cmdlines  # the cluster is this process's
    # without the dashboard Ray still runs its head process, with the usage-stats module alone
    heads = [c for c in cmdlines if "dashboard/dashboard.py" in c]
    assert all("--modules-to-load=UsageStatsHead" in c for c in heads), heads
    assert not any("Head" in c and "dashboard/dashboard.py" not in c for c in cmdlines), cmdlines  # no module processes
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"  # conftest's own setting, not the 0.5 default


SIGTERM_AFTER_INIT = """
import os, signal, sys
from rsseg import cli, raycluster
signal.signal(signal.SIGTERM, cli._terminated)  # what `platform` installs in main()
if sys.argv[1] == "ray":
    raycluster.init(num_cpus=1)
else:  # the negative control: a bare ray.init replaces it
    import ray
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
try:
    os.kill(os.getpid(), signal.SIGTERM)
    print("not interrupted")
except KeyboardInterrupt:
    print("KeyboardInterrupt")
except SystemExit as exc:
    print("SystemExit", exc.code)
"""


@pytest.mark.parametrize("through", ["ray", "bare"])
def test_sigterm_still_ends_a_command_like_ctrl_c_after_ray_starts(through, tmp_path):
    """A scheduler's SIGTERM (SLURM, Kubernetes) must reach the CLI's handler, which ends a command
    like Ctrl-C (the sweep marks its runs KILLED); ray.init installs its own (sys.exit), and
    `raycluster.init` puts ours back."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", SIGTERM_AFTER_INIT, through], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "RSSEG_WORKDIR": str(tmp_path / "w")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == ("KeyboardInterrupt" if through == "ray" else "SystemExit 15"), out.stdout
