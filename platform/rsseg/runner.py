"""A tracked fine-tuning run: the MLflow run lifecycle around `finetune.run`.

Shared by ``platform finetune`` (a top-level run) and sweep trials (a child run under the
sweep's parent, created by the trial and passed in). The run ends FINISHED, or FAILED / KILLED
with the reason as a tag (`tracking.tracked`); it is never left RUNNING by an error we can see.
"""

from __future__ import annotations

from typing import Callable

from rsseg import resolved, tracking
from rsseg.config.specs import RunSpecBase
from rsseg.resolved import ResolvedRun
from rsseg.workdir import Workdir


def execute(run: ResolvedRun | RunSpecBase, workdir: Workdir | None = None, *, uri: str | None = None, experiment: str | None = None,
            run_name: str | None = None, profile: str | None = None, tracker: tracking.Run | None = None,
            on_eval: Callable | None = None, resume_state: dict | None = None, pretrained=None,
            on_test: Callable[[], None] | None = None, progress: bool = False):
    """Fine-tune ``run`` (resolved; a bare spec is resolved here, with ``profile``) inside an
    MLflow run; returns (FinetuneResult, tracking.Run)."""
    from rsseg import finetune

    res = resolved.of(run, profile)
    spec = res.spec
    workdir = workdir or Workdir.resolve()
    if tracker is None:
        uri = tracking.resolve_uri(uri or spec.tracking.uri, workdir)
        tracker = tracking.start_run(uri, experiment or spec.tracking.experiment or tracking.FINETUNE_EXPERIMENT,
                                     run_name or f"{spec.name}-{spec.method}", tags=res.tags("finetune").to_tags(), workdir=workdir)
    # Idempotent: a resumed run already has its parameters and keeps them.
    tracker.log_params(tracking.flatten(res.config) | {"run_fingerprint": res.config_fingerprint})
    with tracking.tracked(tracker):
        result = finetune.run(res, workdir, tracker=tracker, pretrained=pretrained, on_eval=on_eval, resume_state=resume_state,
                              on_test=on_test, progress=progress)
    return result, tracker
