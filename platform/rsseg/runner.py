"""A tracked fine-tuning run: the MLflow run lifecycle around `finetune.run`.

Shared by ``platform finetune`` (a top-level run) and sweep trials (a child run under the
sweep's parent, created by the trial and passed in). The run ends FINISHED, or FAILED / KILLED
with the reason as a tag (`tracking.tracked`); it is never left RUNNING by an error we can see.
"""

from __future__ import annotations

from typing import Callable

from rsseg import tracking
from rsseg.runtags import RunTags
from rsseg.workdir import Workdir


def execute(run, workdir: Workdir | None = None, *, uri: str | None = None, experiment: str | None = None,
            run_name: str | None = None, profile: str | None = None, tracker: tracking.Run | None = None,
            on_eval: Callable | None = None, resume_state: dict | None = None, pretrained=None,
            on_test: Callable[[], None] | None = None, progress: bool = False):
    """Fine-tune ``run`` inside an MLflow run; returns (FinetuneResult, tracking.Run)."""
    from rsseg import finetune
    from rsseg.provenance import fingerprint

    workdir = workdir or Workdir.resolve()
    if tracker is None:
        uri = tracking.resolve_uri(uri or run.tracking.uri, workdir)
        tracker = tracking.start_run(uri, experiment or run.tracking.experiment or tracking.FINETUNE_EXPERIMENT,
                                     run_name or f"{run.name}-{run.method}",
                                     tags=RunTags.for_run(run, kind="finetune", profile=profile).to_tags(), workdir=workdir)
    # Idempotent: a resumed run already has its parameters and keeps them.
    tracker.log_params(tracking.flatten(run.active_config()) | {"run_fingerprint": fingerprint(run.model_dump(mode="json"))})
    with tracking.tracked(tracker):
        result = finetune.run(run, workdir, tracker=tracker, pretrained=pretrained, on_eval=on_eval, resume_state=resume_state,
                              on_test=on_test, progress=progress)
    return result, tracker
