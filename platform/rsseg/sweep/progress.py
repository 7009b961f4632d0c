"""The live progress table of a sweep: trials done / running / failed / pending, best metric."""

from __future__ import annotations

import math

from ray import tune

from rsseg.progress import line


class SweepProgress(tune.Callback):
    def __init__(self, total: int, metric: str, mode: str):
        self.total, self.metric, self.mode = total, metric, mode
        self.done, self.failed, self.running = set(), set(), set()
        self.best: tuple[float, str] | None = None
        self._last = ""

    def _show(self, final: bool = True) -> None:
        best = f"best {self.metric} {100 * self.best[0]:.2f} ({self.best[1]})" if self.best else f"best {self.metric} -"
        pending = max(0, self.total - len(self.done) - len(self.failed) - len(self.running))
        text = f"trials: {len(self.done)} done, {len(self.running)} running, {len(self.failed)} failed, {pending} pending | {best}"
        if text != self._last:
            self._last = text
            line(text, "trials", final=final)  # a new result alone is throttled in a log; a trial's start/end is not

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._show()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            if self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0]):
                self.best = (float(value), trial.trial_id)
        self._show(final=False)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done.add(trial.trial_id)
        self._show()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.failed.add(trial.trial_id)
        self._show()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._show()
