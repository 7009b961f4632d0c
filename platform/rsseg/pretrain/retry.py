"""Ray Train's failure policy, except that errors no retry can fix are raised at once.

The class subclasses Ray's policy, so it is built on first use (`policy_class`), not at import:
importing this module loads no Ray (the compute core needs torch alone)."""

from __future__ import annotations

import functools

from rsseg.errors import is_fatal


@functools.lru_cache(maxsize=1)
def policy_class() -> type:
    """``FatalErrorsRaise``, one class per process (so that ``isinstance`` holds across calls)."""
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    class FatalErrorsRaise(DefaultFailurePolicy):
        """A worker group failed with a full disk or an input error (an RssegError) on any worker:
        RAISE instead of restarting the group from the last checkpoint to fail the same way."""

        def make_decision(self, training_failed_error):
            if isinstance(training_failed_error, WorkerGroupError) and any(
                    is_fatal(e) for e in training_failed_error.worker_failures.values()):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return FatalErrorsRaise


def fatal_errors_raise(failure_config):
    """The policy Ray Train's trainer gets for ``failure_config``."""
    return policy_class()(failure_config)
