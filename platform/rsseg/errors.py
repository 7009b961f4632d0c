"""Errors the user can act on.

Every error a user can cause (bad config, bad data, a wrong checkpoint) is an `RssegError`: the
CLI prints its message as one line and exits with status 2, without a traceback. The message
names the file, key or value and says what was expected.
"""


class RssegError(Exception):
    """Base class of errors caused by input, printed as one line."""

    def __init__(self, message: str):
        # One line: a multi-line message would break log parsers and the CLI contract.
        super().__init__(" ".join(str(message).split("\n")))


class ConfigError(RssegError):
    """A config file, profile or override is invalid."""


class DataError(RssegError):
    """A dataset, raster or class table is invalid."""


class CheckpointError(RssegError):
    """A checkpoint is missing, truncated or belongs to another spec."""


class TrackingError(RssegError):
    """The MLflow tracking store cannot be used."""


class SweepError(RssegError):
    """A sweep cannot be planned, run or resumed."""


class DiskFullError(RssegError):
    """A write failed for lack of space (or quota): nothing a retry can fix."""


_NO_SPACE = (28, 122)  # errno ENOSPC, EDQUOT (Linux)


def disk_full_path(exc: BaseException) -> str | None:
    """The path of a "no space left" failure anywhere in ``exc``'s chain (causes, Ray's wrapped
    worker errors, or their text when only that crossed the process boundary), else None."""
    import re

    for e in _chain(exc):
        if isinstance(e, DiskFullError):
            return str(e).removeprefix("no space left on ").split(" ")[0]
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return str(e.filename or "?")
        m = re.search(r"\[Errno (28|122)\] [^:'\n]*(?::\s*'([^']*)')?", str(e))
        if m:
            return m.group(2) or "?"
    return None


# Errors from other libraries that fail the same way on every retry, by their text (they may
# reach us only as text, across Ray's process boundary): the MLflow run a worker logs to is not in
# the store it reaches (a node with its own SQLite file), Ray's storage check (a storage_path
# another node cannot see).
UNRETRYABLE = ("MlflowException: Run with id=", "Unable to set up cluster storage")


def _unretryable(e: BaseException) -> bool:
    text = str(e)
    return (getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" and text.startswith("Run with id=")
            or any(marker in text for marker in UNRETRYABLE))


def is_fatal(exc: BaseException) -> bool:
    """An error no retry can fix: bad input (an RssegError), a full disk, or one of `UNRETRYABLE`."""
    return any(isinstance(e, RssegError) or _unretryable(e) for e in _chain(exc)) or disk_full_path(exc) is not None


def _chain(exc: BaseException):
    """``exc`` and every exception behind it, each once: causes, contexts, Ray's wrapped ``cause``
    and a Train worker group's ``worker_failures``."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
