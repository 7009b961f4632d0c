"""One sweep trial: a Tune function trainable around the same `runner.execute` as
``platform finetune``.

- The trial receives its planned run resolved (`rsseg.resolved.ResolvedRun`, by the planner,
  once) and derives nothing from it; a trial with Optuna's samples is a run the plan could not
  know: the samples are overlaid on the planned spec and that run is resolved once, here.
- Its pre-training is only found in the store: the driver trained it before any trial started.
- Its MLflow child run is created under the sweep's parent run, or — when the trial is restarted
  (a Tune retry, a resumed sweep, or the driver re-planning a trial Tune's restored state lost) —
  found again by its ``trial_slot`` tag and continued, so no run is duplicated. It ends FINISHED
  or FAILED (with the error as a tag).
- Each validation reports to Tune (the search metric) and saves the trial's resume state (head,
  optimiser, iteration) atomically in the work directory, keyed by the MLflow run; a restarted
  trial continues from it. Not Tune's checkpoints: Tune copies its experiment state to storage
  asynchronously, so a driver killed mid-copy leaves it pointing at an older checkpoint, or
  without the trial at all.
- Paths and the tracking URI arrive absolute: trials run in their own working directory.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch

from rsseg.errors import is_fatal

def sampled_values(config: dict[str, Any], search_axes: dict[str, dict]) -> dict[str, Any]:
    """The values Optuna sampled for this trial (its ``s__a__b`` keys; a choice is an index)."""
    from rsseg.sweep.plan import search_key

    values = {}
    for path, axis in search_axes.items():
        key = search_key(path)
        if key not in config:
            continue
        sampled = config[key]
        if axis.get("choice") is not None:
            values[path] = axis["choice"][int(sampled)]
        elif axis.get("int") is not None:
            values[path] = int(sampled)
        else:
            values[path] = float(sampled)
    return values


def resume_path(workdir, sweep: str, run_id: str) -> Path:
    """The trial's resume state (written at each validation, removed when its run has ended)."""
    return workdir.sweeps / sweep / "trials" / f"{run_id}.pt"


def _save_resume_state(path: Path, state: dict[str, Any]) -> None:
    from rsseg.atomic import atomic_path

    from rsseg import storage

    with atomic_path(path) as tmp:  # a kill mid-write leaves the previous state, never a torn one
        torch.save(state, tmp)
    storage.push(path)  # object storage: a restart may land on another node


def _load_resume_state(path: Path) -> dict[str, Any] | None:
    """The state a killed attempt left (fetched afresh from object storage: it is rewritten in place), or None."""
    from rsseg import storage

    storage.pull(path, fresh=True)
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def _child_run(ctx: dict[str, Any], res, trial_id: str, slot: str, values: dict[str, Any]):
    import ray

    from rsseg import tracking

    uri, experiment = ctx["uri"], ctx["experiment"]
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(uri, experiment)
    found = c.search_runs([exp_id], filter_string=f"tags.trial_slot = '{slot}' and tags.sweep_parent = '{ctx['parent_run_id']}'",
                          max_results=5)
    node = {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}
    if found:
        r = found[0]
        tracker = tracking.Run(uri, r.info.run_id, exp_id)
        if r.info.status == "FINISHED":
            return tracker  # finished before the driver died: reported again, never re-run
        c.update_run(r.info.run_id, status="RUNNING")
        attempt = int(r.data.tags.get("attempt", "1")) + 1
        tracker.set_tags({"attempt": attempt, "trial_id": trial_id, **node, "error": "", "early_stopped": ""})
        return tracker
    tags = res.tags("finetune", sweep=ctx["sweep"], table=ctx["table"], trial_id=trial_id, trial_slot=slot, trial_key=res.key,
                    sweep_parent=ctx["parent_run_id"], attempt=1, space={k: str(v) for k, v in values.items()}).to_tags() | node
    return tracking.start_run(uri, experiment, run_label(values)[:200] or trial_id, tags=tags, parent_run_id=ctx["parent_run_id"])


def run_label(values: dict[str, Any]) -> str:
    """A child run's name: what varies, short enough for the MLflow UI's name column
    (``timesteps=[150,100,50] seed=2``; the experiment already names the sweep)."""
    import json

    def short(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))

    return " ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in values.items())


def fault(stage: str, run, context: dict[str, Any]) -> None:
    """Test hook (``RSSEG_FAULT_KILL_DRIVER=<seed>:<stage>,...``): SIGKILL the sweep driver, once,
    when the trial of that seed reaches the stage — the crash a resume must survive."""
    spec = os.environ.get("RSSEG_FAULT_KILL_DRIVER")
    if not spec or f"{run.seed}:{stage}" not in spec.split(","):
        return
    marker = Path(context["workdir"]) / f".fault-{run.seed}-{stage}"
    if marker.exists():
        return
    marker.write_text(stage)
    import signal

    os.kill(int(context["driver_pid"]), signal.SIGKILL)
    os._exit(1)


def _report_finished(tune, c, tracker, run, metric: str) -> None:
    """A child run that ended FINISHED before a resume: its final metrics, from MLflow."""
    m = c.get_run(tracker.run_id).data.metrics
    tune.report({**{k: v for k, v in m.items() if k.startswith(("val/", "test/"))},
                 metric: m.get(metric, float("nan")), "iteration": run.finetune.iterations,
                 "trainable_params": m.get("params/trainable", 0.0), "done": 1.0})


def _trial_run(config: dict[str, Any], context: dict[str, Any], runs: tuple, trial_id: str):
    """(the trial's resolved run: the planned cell's, or with Optuna's samples resolved here; its
    axis values; its slot)."""
    cell = config["cell"]
    slot = cell.get("slot") or f"{cell['index']}:{trial_id}"  # grid cells carry theirs; Optuna's samples are new trials
    planned = runs[cell["index"]]
    sampled = sampled_values(config, context["search_axes"])
    if not sampled:
        return planned, cell["values"], slot
    from rsseg.resolved import resolve
    from rsseg.sweep.plan import build_run

    return resolve(build_run(planned.spec.model_dump(mode="json", by_alias=True), sampled), planned.profile), \
        {**cell["values"], **sampled}, slot


def trial_fn(config: dict[str, Any], context: dict[str, Any], runs: tuple = ()) -> None:
    """``runs``: the plan's resolved runs (by cell index), put in Ray's object store once."""
    from ray import tune

    from rsseg import runner
    from rsseg.workdir import Workdir

    trial_id = tune.get_context().get_trial_id()
    res, values, slot = _trial_run(config, context, runs, trial_id)
    run = res.spec
    torch.set_num_threads(max(1, int(context["threads"])))
    workdir = Workdir.at(context["workdir"], context.get("storage"))
    workdir.export()
    tracker = _child_run(context, res, trial_id, slot, values)
    from rsseg import tracking

    c = tracking.client(context["uri"])
    if c.get_run(tracker.run_id).info.status == "FINISHED":
        _report_finished(tune, c, tracker, run, context["metric"])
        return

    state_file = resume_path(workdir, context["sweep"], tracker.run_id)
    resume_state = _load_resume_state(state_file)
    if resume_state is not None:
        tracker.set_tags({"resumed_from_iteration": resume_state["iteration"]})

    # the last validation's metrics: the final report carries them even when a restored trial
    # has no iteration left to validate (Tune requires the search metric in every result)
    history = (resume_state or {}).get("val_history") or [{}]
    last_val: dict[str, float] = {k: v for k, v in history[-1].items() if k.startswith("val/")}

    def on_eval(iteration: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
        fault("mid-training", run, context)
        last_val.clear()
        last_val.update({k: v for k, v in metrics.items() if k.startswith("val/")})
        _save_resume_state(state_file, state)
        tune.report({**metrics, "iteration": iteration})
        if iteration == run.finetune.iterations:
            fault("after-last-validation", run, context)

    # The driver trained every planned pre-training before the first trial: fine-tuning only finds
    # it in the store (`ensure_pretrained(..., allow_training=False)`), inside the tracked run.
    try:
        result, _ = runner.execute(res, workdir, tracker=tracker, on_eval=on_eval, resume_state=resume_state,
                                   on_test=lambda: fault("mid-test-evaluation", run, context))
    except Exception as exc:
        # a deterministic input error or a full disk (the run is FAILED with it): retrying cannot
        # help, so the trial ends here with the worst value instead of raising into Tune's retries
        if not is_fatal(exc):
            raise
        state_file.unlink(missing_ok=True)  # FAILED for good: never resumed
        tune.report({context["metric"]: float("-inf") if context["mode"] == "max" else float("inf"), "done": 1.0, "failed": 1.0})
        return
    state_file.unlink(missing_ok=True)  # the run FINISHED: a restart reports it from MLflow
    fault("after-run-ended", run, context)
    final = {**last_val, **result.metrics(), "iteration": run.finetune.iterations,
             "trainable_params": float(result.trainable_params), "done": 1.0}
    tune.report(final)
