"""Real services for the cluster tests, started here and stopped with their whole process group:
an MLflow tracking server (`platform server`), PostgreSQL (Debian's package), a Ray cluster whose
second node cannot see the driver's work directory."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
# Debian's postgresql package: /usr/lib/postgresql/<major>/bin (the newest installed)
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
             default=Path("/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the platform's and Ray's own settings, plus ``extra``.
    Ray's single-machine switch goes too: this process sets it when it starts a local cluster
    (`raycluster.loopback_only`), and a `ray start --head` under it makes no cluster others can join."""
    from ray._private.ray_constants import ENABLE_RAY_CLUSTERS_ENV_VAR  # the name loopback_only sets

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RSSEG_WORKDIR", "RSSEG_STORAGE", "MLFLOW_TRACKING_URI", ENABLE_RAY_CLUSTERS_ENV_VAR)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env | extra


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group (``ray start --block`` stops its node's processes on it), then
    SIGKILL to the group and to every descendant (some of Ray's agents leave the group)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def tracking_server(root: Path, *args: str):
    """``platform server`` on a free port, its SQLite store under ``root`` unless ``args`` say
    otherwise; yields its URI."""
    port = free_port()
    log = open(root.parent / f"{root.name}-server.log", "w")
    proc = subprocess.Popen([str(BIN / "platform"), "--workdir", str(root), "server", "--port", str(port), *args],
                            env=clean_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


def can_isolate_a_node() -> str | None:
    """Why a node in its own mount namespace cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "a node with its own mount namespace and tmpfs needs root"
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"unshare --mount is refused here: {r.stderr.strip()[:200]}"
    return None


class TwoNodes:
    """A Ray head with no CPUs and a second node (2 CPUs, resource ``node2``) in its own mount
    namespace with an empty tmpfs over ``hidden``: trials and Train workers all land on node 2,
    which cannot see the driver's files there (DESIGN.md section 10)."""

    def __init__(self, base: Path, hidden: Path):
        self.base, self.hidden = base, hidden
        self.temp = base / "t"
        self.procs: list[subprocess.Popen] = []
        self.env = clean_env(RAY_AUTH_MODE="token")

    def start(self) -> "TwoNodes":
        self.temp.mkdir(parents=True, exist_ok=True)
        self.hidden.mkdir(parents=True, exist_ok=True)
        port = free_port()
        head_log = self.base / "head.log"
        self.procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--num-cpus", "0", "--port", str(port), "--temp-dir", str(self.temp),
             "--include-dashboard=false", "--block"], env=self.env, stdout=open(head_log, "w"), stderr=subprocess.STDOUT,
            start_new_session=True))
        self.address = self._address(head_log)
        node = (f"mount -t tmpfs tmpfs {self.hidden} && exec {BIN / 'ray'} start --block --address {self.address} "
                f"--num-cpus 2 --resources '{{\"node2\": 10}}' --temp-dir {self.temp}")
        self.procs.append(subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", node], env=self.env,
                                           stdout=open(self.base / "node2.log", "w"), stderr=subprocess.STDOUT, start_new_session=True))
        self._wait_for_node2()
        return self

    def _address(self, log: Path, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(r"ray start --address='([^']+)'", log.read_text() if log.exists() else "")
            if m:
                return m.group(1)
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"the Ray head exited: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        raise RuntimeError("the Ray head did not start")

    def _wait_for_node2(self, timeout: float = 120) -> None:
        probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                 "print([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('node2')])")
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run([sys.executable, "-c", probe, self.address], env=self.env, capture_output=True, text=True)
            ids = re.findall(r"'([0-9a-f]{20,})'", r.stdout)
            if ids:
                self.node2_id = ids[0]
                return
            if self.procs[1].poll() is not None:
                raise RuntimeError(f"node 2 exited: {(self.base / 'node2.log').read_text()[-2000:]}")
            time.sleep(1)
        raise RuntimeError("node 2 did not join")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as Debian's postgres user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def postgres_missing() -> str | None:
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL is not installed ({PG_BIN}/initdb; Debian's postgresql package)"
    return None


@contextlib.contextmanager
def postgres():
    """A PostgreSQL server of Debian's package in a temporary directory (initdb, pg_ctl), on
    127.0.0.1 and a free port; yields the URI of an empty database ``mlflow``."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    run = lambda *cmd: subprocess.run(_as_postgres([str(c) for c in cmd]), check=True, capture_output=True, text=True)  # noqa: E731
    run(PG_BIN / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    run(PG_BIN / "pg_ctl", "-D", data, "-l", root / "log", "-w", "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        run(PG_BIN / "psql", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-c", "CREATE DATABASE mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def psql(uri: str, query: str) -> list[list[str]]:
    """Rows of ``query`` on the database of ``uri`` (through psql, not the platform)."""
    m = re.match(r"postgresql://(\w+)@([\d.]+):(\d+)/(\w+)", uri)
    user, host, port, db = m.groups()
    out = subprocess.run(_as_postgres([str(PG_BIN / "psql"), "-h", host, "-p", port, "-U", user, "-d", db, "-At", "-F", "\t", "-c", query]),
                         check=True, capture_output=True, text=True).stdout
    return [line.split("\t") for line in out.splitlines() if line]


S3_ENV = {"AWS_ACCESS_KEY_ID": "rsseg-test", "AWS_SECRET_ACCESS_KEY": "rsseg-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server(root: Path, bucket: str = "rsseg"):
    """An S3-compatible server on 127.0.0.1 (moto's server mode: installable from PyPI, in-memory,
    speaks the S3 API pyarrow's S3FileSystem uses) with ``bucket`` created; yields its endpoint."""
    from pyarrow import fs

    port = free_port()
    log = open(root.parent / f"{root.name}-s3.log", "w")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=clean_env(**S3_ENV),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", proc)
        endpoint = f"127.0.0.1:{port}"
        s3(endpoint, allow_bucket_creation=True).create_dir(bucket)
        yield endpoint
    finally:
        stop(proc)
        log.close()


def s3(endpoint: str, **kw):
    """pyarrow's S3 filesystem on the test server (what the platform opens from its URI)."""
    from pyarrow import fs

    return fs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                           access_key=S3_ENV["AWS_ACCESS_KEY_ID"], secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], **kw)
