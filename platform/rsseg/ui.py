"""``platform ui``: the MLflow UI on the work directory's store, at 127.0.0.1.

With ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` naming a shared ``mlflow server`` there is
nothing to start: the server *is* the UI, and its URL is printed.
"""

from __future__ import annotations

import subprocess
import sys

from rsseg import tracking
from rsseg.workdir import Workdir


def command(uri: str, workdir: Workdir, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
            "--default-artifact-root", workdir.artifacts.as_uri(), "--host", host, "--port", str(port)]


def serve(workdir: Workdir, port: int = 5000, tracking_uri: str | None = None) -> None:
    uri = tracking.resolve_uri(tracking_uri, workdir)
    if uri.startswith(("http://", "https://")):
        tracking.check_reachable(uri)
        print(f"MLflow server: {uri}  (shared; nothing to start)")
        return
    tracking.init_store(uri)
    print(f"MLflow UI: http://127.0.0.1:{port}  (store {uri}; Ctrl-C to stop)", flush=True)
    try:
        subprocess.run(command(uri, workdir, port=port), check=False)
    except KeyboardInterrupt:
        pass
