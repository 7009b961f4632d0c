"""Progress lines for long-running commands: overwritten in place on a terminal; in a log file
(output not a terminal) at most one line per ``RSSEG_PROGRESS_SECONDS`` (default 30) for each
stream of lines, so that a long run's log stays readable (the demo printed ~360 lines before)."""

from __future__ import annotations

import os
import sys
import threading
import time

_lock = threading.Lock()
_last_shown: dict[str, float] = {}  # stream -> when its last line was printed (non-terminal output)
_held: dict[str, str] = {}  # stream -> its latest line not printed yet (printed by done())


def interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get("RSSEG_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def line(text: str, stream: str | None = None, final: bool = False) -> None:
    """Show ``text``. ``stream`` names the series it belongs to (default: its first two words,
    e.g. ``pretrain 3f2a...``); a ``final`` line (a state change, the last step) always prints."""
    with _lock:
        if sys.stdout.isatty():
            sys.stdout.write("\r\033[K" + text)
            sys.stdout.flush()
            return
        key = stream if stream is not None else " ".join(text.split()[:2])
        now = time.monotonic()
        if not final and now - _last_shown.get(key, -1e9) < interval_s():
            _held[key] = text
            return
        _held.pop(key, None)
        _last_shown[key] = now
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def done() -> None:
    """End the progress display: a terminal gets its newline, a log the latest held lines."""
    with _lock:
        if sys.stdout.isatty():
            sys.stdout.write("\n")
        else:
            for text in _held.values():
                sys.stdout.write(text + "\n")
            _held.clear()
            _last_shown.clear()
        sys.stdout.flush()
