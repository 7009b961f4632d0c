"""MLflow as the sweep's record once Tune returns: runs left RUNNING are ended with the reason,
trials Tune lost are found, the best trial is chosen on validation and summarised."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from rsseg.sweep.plan import SweepPlan, grid_cells

log = logging.getLogger(__name__)

EARLY_STOPPED = "stopped by the scheduler (ASHA) before the end"  # the early_stopped tag of a run that ended


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    experiment_id: str
    uri: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # trials Tune ran that have no run in the store

    @property
    def finished(self) -> int:
        return sum(1 for t in self.trials if t["status"] == "FINISHED")

    @property
    def failed(self) -> int:
        return sum(1 for t in self.trials if t["status"] == "FAILED")


def mark_interrupted(client, exp_id: str, parent_id: str) -> None:
    """Ctrl-C / SIGTERM of the driver: the trials it leaves running end KILLED (the parent too, by
    its tracked block); --resume re-opens them."""
    for r in client.search_runs([exp_id], filter_string=f"tags.sweep_parent = '{parent_id}' and attributes.status = 'RUNNING'"):
        client.set_tag(r.info.run_id, "error", "sweep interrupted; continue it with --resume")
        client.set_terminated(r.info.run_id, status="KILLED")


def close_interrupted(client, previous: dict[str, Any], name: str) -> None:
    """A new invocation after an earlier one: runs it left RUNNING (its driver died) are marked
    KILLED, whatever the parent's status, and a RUNNING parent too."""
    exp = previous["experiment_id"]
    left = client.search_runs([exp], filter_string=f"tags.sweep_parent = '{previous['parent_run_id']}' and attributes.status = 'RUNNING'")
    for r in left:
        client.set_tag(r.info.run_id, "error", "sweep interrupted; a new invocation started instead of --resume")
        client.set_terminated(r.info.run_id, status="KILLED")
    parent = client.get_run(previous["parent_run_id"])
    if parent.info.status == "RUNNING":
        client.set_tag(previous["parent_run_id"], "error", "interrupted; superseded by a new invocation")
        client.set_terminated(previous["parent_run_id"], status="KILLED")
    if left or parent.info.status == "RUNNING":
        log.warning("sweep %s: the previous invocation was interrupted; its runs are marked KILLED (use --resume to continue one)", name)


def slot_of(res) -> str | None:
    cell = (res.config or {}).get("cell") or {}
    return cell.get("slot") or (f"{cell['index']}:{res.metrics['trial_id']}" if "index" in cell and (res.metrics or {}).get("trial_id") else None)


def missing_slots(plan: SweepPlan, client, exp_id: str, parent_id: str, grids) -> list:
    """The trials that have not ended: grid slots, or (cell, samples owed) per Optuna cell.

    Ended: its MLflow run FINISHED or FAILED, or stopped early by the scheduler, or Tune ended it
    in this invocation (its result is in ``grids``; an error there is a FAILED run by reconciling).
    A RUNNING run Tune did not return, or no run at all, is a trial the restored state lost."""
    ended = {slot_of(res) for grid in grids for res in grid} - {None}
    for run in client.search_runs([exp_id], filter_string=f"tags.sweep_parent = '{parent_id}'", max_results=5000):
        tags, status = run.data.tags, run.info.status
        if status in ("FINISHED", "FAILED") or tags.get("early_stopped") == EARLY_STOPPED:
            ended.add(tags.get("trial_slot"))
    if plan.spec.search.algorithm == "grid":
        return [s for s in grid_cells(plan) if s not in ended]
    owed = []
    for i in range(len(plan.trials)):
        n = sum(1 for s in ended if s and s.split(":", 1)[0] == str(i))
        if n < plan.spec.search.num_samples:
            owed.append((i, plan.spec.search.num_samples - n))
    return owed


def best_trial(result: SweepResult, mode: str) -> dict[str, Any] | None:
    """The finished trial with the best value of the search metric (what Optuna / ASHA optimise),
    or None when no finished trial reported it."""
    scored = [t for t in result.trials if t["status"] == "FINISHED" and t.get("score") is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda t: t["score"])


def record_best_trial(parent_run, result: SweepResult, metric: str, mode: str) -> None:
    """On the parent run: which trial won the search (its run, trial id and values) and its score,
    so that a searched sweep's answer is read off one run."""
    best = best_trial(result, mode)
    if best is None:
        return
    parent_run.set_tags({"best_run_id": best["run_id"], "best_trial_id": best["trial_id"] or "",
                         **{f"best.{k}": str(v)[:500] for k, v in best["values"].items()}})
    # the winner's test score is reported beside its validation score, never used to choose it
    parent_run.log_metrics({f"best_{metric.replace('/', '_')}": best["score"],
                            **({"best_trial_test_mIoU": best["mIoU"]} if best.get("mIoU") is not None else {})})


def reconcile(client, uri: str, name: str, exp_id: str, parent_id: str, grids, metric: str = "val/mIoU") -> SweepResult:
    """After Tune returns no trial is running: a child still RUNNING was stopped early (ASHA) or
    lost with its worker; it is ended, not left RUNNING. MLflow is the record of the summary."""
    errors, reported = {}, set()
    for grid in grids:
        for res in grid:
            tid = (res.metrics or {}).get("trial_id")
            if tid:
                reported.add(tid)
                if res.error is not None:
                    errors[tid] = (str(res.error).strip().splitlines() or ["error"])[-1][:300]
    result = SweepResult(name, parent_id, exp_id, uri)
    children = client.search_runs([exp_id], filter_string=f"tags.sweep_parent = '{parent_id}'", max_results=5000)
    for run in children:
        tags = run.data.tags
        tid = tags.get("trial_id")
        status = run.info.status
        if status == "RUNNING":
            if tid in errors:
                client.set_tag(run.info.run_id, "error", errors[tid])
                status = "FAILED"
            else:
                client.set_tag(run.info.run_id, "early_stopped", EARLY_STOPPED if tid in reported else "trial lost")
                status = "KILLED"
            client.set_terminated(run.info.run_id, status=status)
        elif status == "KILLED" and tid in reported and tid not in errors and "early_stopped" not in tags:
            # the trial ended its own run KILLED when Tune stopped it (ASHA): say so, not as an error
            client.set_tag(run.info.run_id, "early_stopped", EARLY_STOPPED)
            client.set_tag(run.info.run_id, "error", "")
            tags = {**tags, "error": ""}
        values = {k[len("space."):]: v for k, v in tags.items() if k.startswith("space.")}
        result.trials.append({"trial_id": tid, "status": status, "mIoU": run.data.metrics.get("test/mIoU"),
                              "val/mIoU": run.data.metrics.get("val/mIoU"), "score": run.data.metrics.get(metric),
                              "run_id": run.info.run_id, "slot": tags.get("trial_slot"),
                              "values": values, "error": tags.get("error") or None, "node_id": tags.get("node_id")})
    result.lost = lost_trials(grids, result.trials)
    return result


def lost_trials(grids, trials: list[dict[str, Any]]) -> list[str]:
    """Tune's trials of this invocation that no child run in the store stands for (by trial id or
    slot), described by slot and, for a failed one, its error's last line."""
    tids = {t["trial_id"] for t in trials} - {None}
    slots = {t.get("slot") for t in trials} - {None}
    lost = []
    for grid in grids:
        for res in grid:
            if "cell" not in (res.config or {}):
                continue  # not a planned trial: one a restored searcher made up (it fails at once, harmless)
            tid, slot = (res.metrics or {}).get("trial_id"), slot_of(res)
            if (tid and tid in tids) or (slot and slot in slots):
                continue
            what = f"trial {slot or tid or res.path}"
            if res.error is not None:
                what += f" failed: {(str(res.error).strip().splitlines() or ['error'])[-1][:200]}"
            lost.append(what)
    return lost


def summary_table(result: SweepResult, metric: str = "val/mIoU", mode: str = "max") -> str:
    """One line per trial: its values, validation and test mIoU; ``*`` marks the winner, chosen on
    the search metric (validation), never on test."""
    lines = [f"{result.finished} finished, {result.failed} failed, {len(result.trials)} trials — MLflow experiment "
             f"{result.name!r}, parent run {result.parent_run_id} ({result.uri})"]
    best = best_trial(result, mode)
    for t in sorted(result.trials, key=lambda t: str(t["values"])):
        vals = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in t["values"].items())
        if t.get("mIoU") is not None:
            val = t.get("val/mIoU")
            score = (f"val mIoU {100 * val:.1f}  " if val is not None else "") + f"test mIoU {100 * t['mIoU']:.1f}"
        else:
            score = t.get("error") or ""
        mark = "*" if best is not None and t is best else " "
        lines.append(f" {mark}{t['status']:<9} {vals:<50} {score}")
    if best is not None:
        lines.append(f"  * best on {metric} ({mode}); its test mIoU is reported, not used to choose")
    return "\n".join(lines) + "\n"
