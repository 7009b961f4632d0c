"""``platform server``: the MLflow tracking server of a team or a cluster.

On a cluster every trial and Train worker writes its runs, metrics and artifacts through this
server (`rsseg.clustercheck` refuses a SQLite store there): the backend is a database only the
server opens — the work directory's SQLite store by default, or PostgreSQL for a team
(``--backend-store-uri postgresql://user@host/db``) — and artifacts are proxied
(``--serve-artifacts``) to a folder or the storage (``--artifacts-destination``; default: beside a
SQLite store as for ``platform ui``, else ``<storage>/artifacts``), so workers need no shared files
for them. Binds 127.0.0.1 unless ``--host`` (with the warning ``platform ui`` gives).
"""

from __future__ import annotations

import re
import socket

from rsseg import tracking, ui
from rsseg.errors import ConfigError
from rsseg.workdir import Workdir

DATABASES = ("sqlite:", "postgresql:", "postgresql+", "mysql:", "mysql+", "mssql:", "mssql+")


def masked(uri: str) -> str:
    """A database URI without its password, for the terminal."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", uri)


def backend_uri(backend: str | None, workdir: Workdir) -> str:
    if backend is None:
        return tracking.resolve_uri(f"sqlite:///{workdir.mlflow_db}", workdir)
    if "://" not in backend:  # a path: a SQLite file (or a folder holding mlflow.db), as --tracking-uri reads it
        return tracking.resolve_uri(backend, workdir)
    if not backend.startswith(DATABASES):
        raise ConfigError(f"--backend-store-uri {masked(backend)}: expected a database (sqlite:///path/mlflow.db or "
                          "postgresql://user@host/db), which only this server opens")
    return backend


def primary_address() -> str:
    """This machine's address on its default route (what other nodes reach it by); MLflow's host
    check accepts private addresses by default, a host name only through --allowed-hosts."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def serve(workdir: Workdir, port: int = 5000, host: str = "127.0.0.1", backend: str | None = None,
          artifacts: str | None = None, workers: int = 1, allowed_hosts: str | None = None) -> int:
    uri = backend_uri(backend, workdir)
    if artifacts is None and not tracking.is_sqlite(uri):
        artifacts = (workdir.shared / "artifacts").as_uri()
    elif artifacts is not None and "://" not in artifacts:
        artifacts = Workdir.resolve(artifacts).root.as_uri()  # a path, made absolute
    ui.check_address(host, port)
    ui.warn_if_exposed(host, port, "the MLflow tracking server")
    tracking.init_store(uri)  # created and migrated here, once, before any node writes
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    reach = f"http://{primary_address() if host in ('0.0.0.0', '::') else host}:{port}"

    def announce() -> None:
        dest = artifacts or tracking.artifacts_root(uri).as_uri()
        print(f"MLflow tracking server: {url}  (backend {masked(uri)}; artifacts {dest}; Ctrl-C to stop)", flush=True)
        print(f"  runs from any node: --tracking-uri {reach}  (or MLFLOW_TRACKING_URI={reach})", flush=True)

    cmd = ui.command(uri, host, port, workers, artifacts=artifacts) + (["--allowed-hosts", allowed_hosts] if allowed_hosts else [])
    return ui.run_server(cmd, url, announce)
