"""Ray Train's failure policy, except that errors no retry can fix are raised at once."""

from __future__ import annotations

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from rsseg.errors import is_fatal


class FatalErrorsRaise(DefaultFailurePolicy):
    """A worker group failed with a full disk or an input error (an RssegError) on any worker:
    RAISE instead of restarting the group from the last checkpoint to fail the same way."""

    def make_decision(self, training_failed_error):
        if isinstance(training_failed_error, WorkerGroupError) and any(
                is_fatal(e) for e in training_failed_error.worker_failures.values()):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)
