"""``platform ui``: the MLflow UI on the work directory's store.

The server runs with the store's artifacts directory as its artifacts destination (runs of a
local store have ``mlflow-artifacts:/`` URIs, see `tracking`), so a copied or moved work
directory serves its own artifacts. It binds 127.0.0.1 unless ``--host`` says otherwise (with a
warning: the UI has no authentication), starts one worker and no job runner (MLflow's defaults
start 4 uvicorn workers and a huey consumer pool, ~90 s on 2 cores), and prints its URL only once
``/health`` answers. A port in use is an error before anything starts; Ctrl-C or SIGTERM stop the
server's whole process group, and ``platform ui`` exits with the server's status.

With ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` naming a shared ``mlflow server`` there is
nothing to start: the server *is* the UI, and its URL is printed.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from rsseg import tracking
from rsseg.errors import ConfigError, TrackingError
from rsseg.workdir import Workdir

START_TIMEOUT_S = 300.0


def command(uri: str, host: str = "127.0.0.1", port: int = 5000, workers: int = 1, artifacts: str | None = None) -> list[str]:
    """``mlflow server`` on the store ``uri``, artifacts proxied to ``artifacts`` (default: the
    SQLite store's artifacts folder)."""
    # uvicorn's access log put a line per request on the terminal (263 in 3 minutes of browsing)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--artifacts-destination", artifacts or tracking.artifacts_root(uri).as_uri(), "--serve-artifacts",
            "--default-artifact-root", f"{tracking.PROXIED}/", "--host", host, "--port", str(port), "--workers", str(workers),
            "--uvicorn-opts", "--no-access-log --log-level warning"]


def experiment_links(uri: str, url: str) -> list[str]:
    """One line per experiment: its page in the model-training view, through the sweep's shared
    view (`tracking.set_sweep_view`) where it has one."""
    out = []
    for exp in tracking.client(uri).search_experiments(max_results=200):
        if exp.name == "Default":
            continue
        query = tracking.VIEW_QUERY if f"mlflow.sharedViewState.{tracking.VIEW_KEY}" in exp.tags else "workflowType=machine_learning"
        out.append(f"  {exp.name:<24} {url}/#/experiments/{exp.experiment_id}/runs?{query}")
    return out


def check_address(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port number from 1 to 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--port {port}: {host}:{port} is not free ({exc.strerror}); choose another --port") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise TrackingError(f"the MLflow server exited with status {proc.returncode} before answering {url}/health")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TrackingError(f"the MLflow server did not answer {url}/health within {timeout:.0f} s")


def serve(workdir: Workdir, port: int = 5000, tracking_uri: str | None = None, host: str = "127.0.0.1", workers: int = 1) -> int:
    uri = tracking.resolve_uri(tracking_uri, workdir)
    if uri.startswith(("http://", "https://")):
        tracking.check_reachable(uri)
        print(f"MLflow server: {uri}  (shared; nothing to start)")
        return 0
    check_address(host, port)
    warn_if_exposed(host, port)
    tracking.init_store(uri)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    def announce() -> None:
        print(f"MLflow UI: {url}/#/?workflowType=machine_learning  (store {uri}; Ctrl-C to stop)", flush=True)
        for link in experiment_links(uri, url):
            print(link, flush=True)

    return run_server(command(uri, host, port, workers), url, announce)


def warn_if_exposed(host: str, port: int, what: str = "the MLflow UI") -> None:
    if not is_loopback(host):
        print(f"warning: --host {host}: {what} has no authentication; anyone who can reach {host}:{port} can read and "
              "change the runs", file=sys.stderr)


def run_server(cmd: list[str], url: str, announce) -> int:
    """Start ``cmd`` (an MLflow server) in its own process group, call ``announce`` once ``url``
    answers /health, and wait; Ctrl-C or SIGTERM stop the whole group. Returns its exit status."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(signum=signal.SIGTERM, _frame=None):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        wait_healthy(url, proc)
        announce()
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                stop()
    finally:
        stop()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        for s, handler in previous.items():
            signal.signal(s, handler)
