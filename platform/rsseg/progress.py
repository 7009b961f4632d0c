"""Progress lines for long-running commands (overwritten in place on a terminal)."""

from __future__ import annotations

import sys
import threading

_lock = threading.Lock()


def line(text: str) -> None:
    with _lock:
        if sys.stdout.isatty():
            sys.stdout.write("\r\033[K" + text)
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()


def done() -> None:
    with _lock:
        if sys.stdout.isatty():
            sys.stdout.write("\n")
            sys.stdout.flush()
