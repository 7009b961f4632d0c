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
