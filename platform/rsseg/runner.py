"""A tracked fine-tuning run: MLflow run lifecycle around `finetune.run`.

Shared by ``platform finetune`` (a top-level run) and sweep trials (a child run under the
sweep's parent, found again by its ``trial_id`` tag on resume). The run ends FINISHED or
FAILED (with the reason as a tag); it is never left RUNNING by an error we can see.
"""

from __future__ import annotations

from typing import Any, Callable

from rsseg import tracking
from rsseg.workdir import Workdir

FINETUNE_EXPERIMENT = "rsseg-finetune"


def run_tags(run, *, profile: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, str]:
    from rsseg.methods import get
    from rsseg.provenance import git_commit
    from rsseg.pretrain import store

    method = get(run.method)
    tags = {
        "method": run.method,
        "label_ratio": f"{run.data.label_ratio:g}",
        "frozen": str(run.finetune.frozen).lower(),
        "dataset": run.data.dataset,
        "seed": str(run.seed),
        "profile": profile or "",
        "git_commit": git_commit(),
        "kind": "finetune",
    }
    if method.needs_pretraining(run):
        tags["pretrain_fingerprint"] = store.fingerprint(run)
        archive, homogeneous = run.pretrain.iterations.counts()
        # Fig. 9/10 key: the share of pre-training iterations spent on homogeneous imagery.
        tags["homogeneous_share"] = f"{homogeneous / (archive + homogeneous):g}"
    tags.update(method.run_tags(run))
    tags.setdefault("timesteps", "")
    tags.update({k: str(v) for k, v in (extra or {}).items() if v is not None})
    return tags


def execute(run, workdir: Workdir | None = None, *, uri: str | None = None, experiment: str | None = None,
            run_name: str | None = None, tags: dict[str, str] | None = None, parent_run_id: str | None = None,
            reuse_tag: tuple[str, str] | None = None, on_eval: Callable | None = None, resume_state: dict | None = None,
            pretrained=None, tracker: tracking.Run | None = None):
    """Fine-tune ``run`` inside an MLflow run; returns (FinetuneResult, tracking.Run)."""
    from rsseg import finetune
    from rsseg.provenance import fingerprint

    workdir = workdir or Workdir.resolve()
    uri = tracking.resolve_uri(uri or run.tracking.uri, workdir)
    if tracker is None:
        tracker = tracking.start_run(
            uri, experiment or run.tracking.experiment or FINETUNE_EXPERIMENT,
            run_name or f"{run.name}-{run.method}", tags=tags or run_tags(run), parent_run_id=parent_run_id,
            workdir=workdir, reuse_tag=reuse_tag,
        )
    # Idempotent: a resumed run already has its parameters and keeps them.
    tracker.log_params(tracking.flatten(run.model_dump(mode="json")) | {"run_fingerprint": fingerprint(run.model_dump(mode="json"))})
    try:
        result = finetune.run(run, workdir, tracker=tracker, pretrained=pretrained, on_eval=on_eval, resume_state=resume_state)
    except BaseException as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
        tracker.set_tags({"error": f"{type(exc).__name__}: {reason}"})
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    return result, tracker
