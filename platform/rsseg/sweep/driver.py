"""The sweep driver: MLflow parent run, pre-trainings, Ray Tune, resume, reconciliation.

Order matters (DESIGN.md section 9):

1. plan and validate everything (no Ray, no MLflow yet);
2. check the tracking store is reachable and initialise it from this one process, then create
   the experiment (named after the sweep) and the parent run, before any trial exists;
3. ensure every distinct pre-training once (Ray Train; in parallel when the cluster has the
   CPUs), so trials only ever *find* their checkpoint;
4. run the trials as a Tune function trainable (grid: Tune's grid search over the expanded
   cells; optuna: one Optuna searcher per grid cell, its sampler seeded), with per-trial
   resources, ``max_concurrent``, optional ASHA and trial retries (``tune.FailureConfig``);
5. reconcile: a child run Tune stopped early (ASHA) or lost is not left RUNNING.

``--resume`` restores the Tune experiment(s) of the last invocation (``Tuner.restore``, Optuna
state included): finished trials are not re-run, unfinished ones continue from their resume
state and find their MLflow child by its ``trial_slot`` tag. Tune's restored state is not the
record, though: Tune copies it to storage asynchronously, so a driver killed mid-copy can leave it
without a running trial, or with its searcher believing that trial still occupies the only slot
(the rest never start). After the restored experiments return, the trials MLflow has not seen
end (``missing_slots``) run in one more Tune experiment, recorded in the state file like the others.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsseg import kernels, tracking
from rsseg.errors import ConfigError, SweepError
from rsseg.sweep import report
from rsseg.sweep.plan import SweepPlan, make_plan, search_key
from rsseg.workdir import Workdir

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


def state_path(workdir: Workdir, name: str) -> Path:
    return workdir.sweeps / name / "state.json"


def _read_state(workdir: Workdir, name: str) -> dict[str, Any] | None:
    p = state_path(workdir, name)
    if not p.exists():
        return None
    return json.loads(p.read_text())


def _write_state(workdir: Workdir, name: str, state: dict[str, Any]) -> None:
    from rsseg.atomic import atomic_write_text

    atomic_write_text(state_path(workdir, name), json.dumps(state, indent=2))


def _pretrain_all(plan: SweepPlan, workdir: Workdir, uri: str, profile: str | None, progress: bool) -> None:
    """Each distinct pre-training once; several at a time when the cluster has the CPUs."""
    from rsseg import raycluster
    from rsseg.pretrain import store
    from rsseg.pretrain.ensure import ensure_pretrained

    runs = [p.spec for p in plan.pretrainings if store.find(p.spec, workdir) is None]
    if not runs:
        return
    parallel = min(raycluster.concurrent_pretrainings(r.pretrain.runtime, r.runtime.device, len(runs)) for r in runs)
    trunks, branches = trunk_order(runs)
    if progress:
        from rsseg.progress import line

        line(f"pre-training {len(runs)} model(s) first ({parallel} at a time): " + ", ".join(r.pretrain_fingerprint for r in runs)
             + (f"; {len(trunks)} trunk(s) first, then the runs branching from them" if trunks else ""), final=True)

    def one(item):
        run, switch_steps = item
        return ensure_pretrained(run, workdir, tracking_uri=uri, profile=profile, progress=progress and parallel == 1,
                                 tags={"sweep": plan.spec.name}, concurrent=parallel, switch_steps=switch_steps)

    for stage in (trunks, branches):  # the branches start from the points the trunks left
        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(stage)))) as pool:
            for f in [pool.submit(one, item) for item in stage]:
                f.result()
    if progress:
        from rsseg.progress import done

        done()


def trunk_order(runs: list) -> tuple[list[tuple[Any, tuple[int, ...]]], list[tuple[Any, tuple[int, ...]]]]:
    """(first, then): per trunk, the run that goes furthest along it trains first and leaves a
    point at every switch step of the others; they then start from those points. Runs of no
    trunk (or alone on theirs) are in ``then`` and run beside the branches."""
    from rsseg.pretrain.identity import lineage

    groups: dict[str, list] = {}
    first, then = [], []
    for run in runs:
        lin = lineage(run)
        if lin.trunk is None:
            then.append((run, ()))
        else:
            groups.setdefault(lin.trunk, []).append((lin.switch, run))
    for members in groups.values():
        members.sort(key=lambda m: -m[0])
        points = tuple(sorted({s for s, _ in members}))
        if len(members) == 1:
            then.append((members[0][1], points))
            continue
        first.append((members[0][1], points))
        then += [(run, (switch,)) for switch, run in members[1:]]
    return first, then


def _optuna_distributions(search_axes) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for path, axis in search_axes.items():
        path = search_key(path)
        if axis.kind == "choice":
            out[path] = CategoricalDistribution(list(range(len(axis.choice))))
        elif axis.kind == "uniform":
            out[path] = FloatDistribution(*axis.uniform)
        elif axis.kind == "loguniform":
            out[path] = FloatDistribution(*axis.loguniform, log=True)
        else:
            out[path] = IntDistribution(*axis.integer)
    return out


def grid_cells(plan: SweepPlan) -> dict[str, dict[str, Any]]:
    """Every grid trial by its slot (``<cell>.<repeat>``): what a trial is, whichever Tuner runs it."""
    return {f"{i}.{r}": {**t.cell, "slot": f"{i}.{r}"}
            for r in range(plan.spec.search.num_samples) for i, t in enumerate(plan.trials)}


def _tuners(plan: SweepPlan, context: dict[str, Any], workdir: Workdir, tune_names: list[str], resume: bool, progress: bool,
            slots: list | None = None, topup: int = 0):
    """One Tuner (grid) or one per grid cell (optuna); restored ones on resume. ``slots`` (a
    top-up): the grid slots to run, or the (cell, samples) still owed per Optuna Tuner."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from rsseg.sweep.progress import SweepProgress
    from rsseg.sweep.trial import trial_fn

    search = plan.spec.search
    res = search.resources
    trainable = tune.with_resources(tune.with_parameters(trial_fn, context=context), {"cpu": res.cpu, "gpu": res.gpu})
    storage, storage_fs = private_storage(workdir)
    n_evals = -(-plan.loaded.base.finetune.iterations // plan.loaded.base.finetune.eval_every) + 1
    cells = grid_cells(plan)
    if slots is None:
        slots = list(cells)
    for i, name in enumerate(tune_names):
        path = f"{storage}/{name}"
        if resume:
            if not tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
                raise SweepError(f"cannot resume sweep {plan.spec.name!r}: no Tune experiment at {path}")
            yield tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                     storage_filesystem=storage_fs)
            continue
        scheduler = None
        if search.asha is not None:
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=n_evals, grace_period=search.asha.grace_period,
                                      reduction_factor=search.asha.reduction_factor)
        callbacks = [SweepProgress(plan.n_trials, search.metric, search.mode)] if progress else []
        # trials keep their own resume state (rsseg.sweep.trial): Tune holds no checkpoints
        # Tune's new output engine prints its experiment box and a TensorBoard hint even at
        # verbose=0; the legacy one at verbose=0 prints nothing: SweepProgress is the display
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        run_config = tune.RunConfig(name=name, storage_path=storage, storage_filesystem=storage_fs, verbose=0, callbacks=callbacks,
                                    failure_config=tune.FailureConfig(max_failures=search.trial_retries))
        if search.algorithm == "grid":
            space = {"cell": tune.grid_search([cells[s] for s in slots])}
            cfg = tune.TuneConfig(metric=search.metric, mode=search.mode, scheduler=scheduler, num_samples=1,
                                  max_concurrent_trials=search.max_concurrent, reuse_actors=True)
        else:
            from ray.tune.search.optuna import OptunaSearch

            index, samples = slots[i] if topup else (i, search.num_samples)
            # a top-up's sampler is seeded apart from the cell's first one: it must not redraw its samples
            searcher = OptunaSearch(space=_optuna_distributions(plan.search_axes), metric=search.metric, mode=search.mode,
                                    seed=search.sampler_seed + index + (7919 * topup))
            if search.max_concurrent:
                searcher = ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent)
            # The planned grid cell travels in param_space; OptunaSearch adds the s__* keys.
            space = {"cell": {**plan.trials[index].cell, "index": index}}
            cfg = tune.TuneConfig(metric=search.metric, mode=search.mode, search_alg=searcher, scheduler=scheduler,
                                  num_samples=samples, max_concurrent_trials=search.max_concurrent, reuse_actors=True)
        yield tune.Tuner(trainable, param_space=space, tune_config=cfg, run_config=run_config)


def run_sweep(loaded, workdir: Workdir | None = None, *, address: str | None = None, tracking_uri: str | None = None,
              resume: bool = False, progress: bool = True) -> SweepResult:
    workdir = workdir or Workdir.resolve()
    workdir.export()  # the planner, the store and the trials resolve this work directory
    kernels.pin(loaded.base.runtime.cpu_kernels)  # before any CPU computation and the local cluster (its workers inherit it)
    with sweep_lock(workdir, loaded.spec.name):
        return _run_sweep(loaded, workdir, address=address, tracking_uri=tracking_uri, resume=resume, progress=progress)


def _run_sweep(loaded, workdir: Workdir, *, address: str | None, tracking_uri: str | None, resume: bool,
               progress: bool) -> SweepResult:
    from rsseg import raycluster
    from rsseg.device import check_sweep_resources

    spec = loaded.spec
    previous = _read_state(workdir, spec.name)
    if resume and previous is None:
        raise SweepError(f"no sweep named {spec.name!r} to resume: {state_path(workdir, spec.name)} does not exist "
                         f"(start it without --resume, or check --workdir)")
    plan = make_plan(loaded, workdir)
    if plan.problems:
        raise ConfigError(f"{loaded.path}: {plan.problems[0]}")
    uri = tracking.resolve_uri(tracking_uri or (previous or {}).get("uri") if resume else tracking_uri or loaded.base.tracking.uri, workdir)
    if resume and uri != previous["uri"]:
        raise SweepError(f"cannot resume sweep {spec.name!r} with --tracking-uri {uri}: its runs are in {previous['uri']}; "
                         "resume with that tracking URI (or start the sweep afresh without --resume)")
    # the cluster before any MLflow run: a refusal (its resources, a node that cannot reach the
    # tracking server, the storage or the data) leaves no run RUNNING
    raycluster.init(address)
    check_sweep_resources(loaded.base.runtime.device, spec.search.resources.gpu, raycluster.total_gpus())
    _preflight(plan, uri, workdir)
    tracking.init_store(uri)  # fails here, before any trial, when the store is unreachable
    exp_id = tracking.experiment_id(uri, spec.name, workdir, description=spec.description)
    tracking.set_sweep_view(uri, exp_id, list(spec.space), spec.search.metric, spec.search.mode)
    client = tracking.client(uri)

    parent_id, tune_names = _open_parent(loaded, plan, workdir, uri, client, exp_id, previous, resume)
    parent_run = tracking.Run(uri, parent_id, exp_id)
    with tracking.tracked(parent_run) as outcome:
        _pretrain_all(plan, workdir, uri, loaded.profile, progress)
        parent_run.set_tags({"pretrain_fingerprints": ",".join(p.fingerprint for p in plan.pretrainings)})
        context = {
            "sweep": spec.name, "table": spec.table or "",
            "workdir": str(workdir.root), "storage": workdir.storage_arg,
            "uri": uri, "experiment": spec.name, "parent_run_id": parent_id,
            "profile": loaded.profile or "", "threads": max(1, int(spec.search.resources.cpu)),
            "metric": spec.search.metric, "mode": spec.search.mode, "driver_pid": os.getpid(),
            "search_axes": {k: v.model_dump(mode="json", by_alias=True) for k, v in plan.search_axes.items()},
        }
        grids = _fit_all(plan, context, workdir, tune_names, resume, progress, client, exp_id, parent_id)
        if progress:
            from rsseg.progress import done

            done()
        result = _reconcile(client, uri, spec.name, exp_id, parent_id, grids, spec.search.metric)
        _summarise(parent_run, result, spec)
        if result.lost:  # never a silent loss: Tune ran them, the store does not hold them
            raise SweepError(f"sweep {spec.name!r}: {len(result.lost)} trial(s) that Tune ran have no run in the tracking store "
                             f"{uri} ({'; '.join(result.lost[:5])}{'; ...' if len(result.lost) > 5 else ''}): their results "
                             "went elsewhere (on a cluster: use `platform server` and --storage, docs/cluster.md)")
        outcome.status = "FINISHED" if result.finished else "FAILED"
    return result


def _open_parent(loaded, plan: SweepPlan, workdir: Workdir, uri: str, client, exp_id: str, previous: dict[str, Any] | None,
                 resume: bool) -> tuple[str, list[str]]:
    """The sweep's parent run and its Tune experiments' names: this invocation's new ones (the
    state file records them), or the previous invocation's on --resume."""
    from rsseg.provenance import git_commit

    spec = loaded.spec
    if resume:
        _check_owner(workdir, spec.name, previous["tune_names"])
        if previous["plan"] != plan.identity():
            raise SweepError(f"cannot resume sweep {spec.name!r}: its file or profile changed since it started "
                             f"(plan {previous['plan']} != {plan.identity()}); resume with the same file and profile")
        parent_id = previous["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        tune_names = previous["tune_names"]
    else:
        if previous is not None and previous["uri"] != uri:
            log.warning("sweep %s: its previous invocation tracked to %s, this one to %s; the earlier runs stay there as they are",
                        spec.name, previous["uri"], uri)
        elif previous is not None:
            _close_interrupted(client, previous, spec.name)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        parent = tracking.start_run(uri, spec.name, f"{spec.name}-{stamp}", workdir=workdir, tags={
            "kind": "sweep", "sweep": spec.name, "table": spec.table or "", "profile": loaded.profile or "",
            "sweep_file": str(loaded.path), "git_commit": git_commit(), "trials_planned": plan.n_trials,
        })
        parent.log_params({"n_trials": str(plan.n_trials), "algorithm": spec.search.algorithm,
                           **{f"space.{k}": json.dumps(v.model_dump(mode="json", by_alias=True, exclude_none=True)) for k, v in spec.space.items()}})
        parent_id = parent.run_id
        n_tuners = 1 if spec.search.algorithm == "grid" else len(plan.trials)
        tune_names = [f"{spec.name}-{stamp}" + (f"-cell{i}" if n_tuners > 1 else "") for i in range(n_tuners)]
        _write_state(workdir, spec.name, {"parent_run_id": parent_id, "experiment_id": exp_id, "uri": uri,
                                          "tune_names": tune_names, "plan": plan.identity(), "profile": loaded.profile,
                                          "sweep_file": str(loaded.path), "started": stamp})
    return parent_id, tune_names


def _preflight(plan: SweepPlan, uri: str, workdir: Workdir) -> None:
    """On a cluster of several nodes, every node reaches the tracking server, the storage and the
    data the trials and the pre-trainings still to do read (`rsseg.clustercheck`)."""
    from rsseg import clustercheck
    from rsseg.pretrain import store
    from rsseg.runspec import parse_run

    if len(clustercheck.alive_nodes()) < 2:
        return
    pending = [p.spec for p in plan.pretrainings if store.find(p.spec, workdir) is None]
    clustercheck.preflight(uri, workdir, clustercheck.run_paths([parse_run(t.run) for t in plan.trials], pending))


def _fit_all(plan, context, workdir, tune_names, resume: bool, progress: bool, client, exp_id: str, parent_id: str) -> list:
    """Every Tune experiment of the sweep (and, on --resume, the top-up of trials Tune lost)."""
    # Ctrl-C / SIGTERM reach us as KeyboardInterrupt (Tune's own handler would end the fit
    # normally, the parent then FINISHED, and print a Tuner.restore hint instead of --resume)
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    try:
        grids = [tuner.fit() for tuner in _tuners(plan, context, workdir, tune_names, resume, progress)]
        if resume:
            grids += _top_up(plan, context, workdir, client, exp_id, parent_id, grids, progress)
    except KeyboardInterrupt:
        _mark_interrupted(client, exp_id, parent_id)
        raise
    return grids


def _summarise(parent_run, result: SweepResult, spec) -> None:
    """The parent run's record of the outcome: counts, the winner (on the search metric), the
    sweep's table and chart (`report`)."""
    parent_run.log_metrics({"trials_finished": result.finished, "trials_failed": result.failed})
    _record_best_trial(parent_run, result, spec.search.metric, spec.search.mode)
    best = best_trial(result, spec.search.mode)
    report.log(parent_run, result.trials, list(spec.space), best["run_id"] if best else None, spec.name,
               {k: [str(v) for v in a.grid] for k, a in spec.space.items() if a.grid is not None})


@contextlib.contextmanager
def sweep_lock(workdir: Workdir, name: str):
    """One driver per sweep name and work directory: a second one says who holds the sweep and
    stops (two drivers would run every trial twice and leave neither resumable). A lock whose
    process is gone (this host) is stale and taken over."""
    import socket

    path = workdir.sweeps / name / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                log.warning("sweep %s: taking over a stale lock of pid %s (no longer running)", name, holder.get("pid"))
                path.unlink(missing_ok=True)
                continue
            raise SweepError(f"sweep {name!r} is already running in {workdir.root} (pid {holder.get('pid', '?')} on "
                             f"{holder.get('host', '?')}, since {holder.get('started', '?')}); wait for it or stop it "
                             f"(a lock left by a crash on another host: delete {path})") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": dt.datetime.now().isoformat(timespec="seconds")}))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def private_storage(workdir: Workdir) -> tuple[str, Any]:
    """The sweeps' Ray storage (path, pyarrow filesystem or None), a local one created or re-moded
    0700: Tune's state in it is unpickled on --resume, so no other user may write (or read) it,
    whatever the umask of a shared work dir. (Object storage: its bucket's access policy decides.)"""
    from rsseg import storage as shared

    if workdir.remote is not None:
        return shared.ray_location(workdir, "sweeps")
    storage = workdir.ray_storage / "sweeps"
    storage.mkdir(parents=True, exist_ok=True)
    for p in (workdir.ray_storage, storage):
        os.chmod(p, 0o700)
    return str(storage), None


def _check_owner(workdir: Workdir, name: str, tune_names: list[str]) -> None:
    """--resume unpickles Tune's experiment state (tuner.pkl): only from storage this user owns."""
    if workdir.remote is not None:
        return  # object storage has no owner uid: the bucket's access policy is the boundary
    for tune_name in tune_names:
        path = workdir.ray_storage / "sweeps" / tune_name
        if path.exists() and path.stat().st_uid != os.getuid():
            raise SweepError(f"cannot resume sweep {name!r}: {path} belongs to another user (uid {path.stat().st_uid}); resuming "
                             "would run code from their files (docs/sweeps.md, trust boundary)")


def _mark_interrupted(client, exp_id: str, parent_id: str) -> None:
    """Ctrl-C / SIGTERM of the driver: the trials it leaves running end KILLED (the parent too, by
    its tracked block); --resume re-opens them."""
    for r in client.search_runs([exp_id], filter_string=f"tags.sweep_parent = '{parent_id}' and attributes.status = 'RUNNING'"):
        client.set_tag(r.info.run_id, "error", "sweep interrupted; continue it with --resume")
        client.set_terminated(r.info.run_id, status="KILLED")


def _close_interrupted(client, previous: dict[str, Any], name: str) -> None:
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


def _slot_of(res) -> str | None:
    cell = (res.config or {}).get("cell") or {}
    return cell.get("slot") or (f"{cell['index']}:{res.metrics['trial_id']}" if "index" in cell and (res.metrics or {}).get("trial_id") else None)


def missing_slots(plan: SweepPlan, client, exp_id: str, parent_id: str, grids) -> list:
    """The trials that have not ended: grid slots, or (cell, samples owed) per Optuna cell.

    Ended: its MLflow run FINISHED or FAILED, or stopped early by the scheduler, or Tune ended it
    in this invocation (its result is in ``grids``; an error there is a FAILED run by reconciling).
    A RUNNING run Tune did not return, or no run at all, is a trial the restored state lost."""
    ended = {_slot_of(res) for grid in grids for res in grid} - {None}
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


def _top_up(plan: SweepPlan, context: dict[str, Any], workdir: Workdir, client, exp_id: str, parent_id: str, grids,
            progress: bool) -> list:
    """Run, in new Tune experiments, what the restored ones lost (see the module's docstring)."""
    missing = missing_slots(plan, client, exp_id, parent_id, grids)
    if not missing:
        return []
    state = _read_state(workdir, plan.spec.name)
    round_ = 1 + sum(1 for n in state["tune_names"] if "-topup" in n)
    base = f"{plan.spec.name}-{state['started']}-topup{round_}"
    if plan.spec.search.algorithm == "grid":
        names, what = [base], f"{len(missing)} grid trial(s): " + ", ".join(missing)
    else:
        names = [f"{base}-cell{i}" for i, _ in missing]
        what = ", ".join(f"{n} sample(s) of cell {i}" for i, n in missing)
    log.warning("sweep %s: %s not ended after the restored Tune experiment(s); running them again (each from its "
                "resume state)", plan.spec.name, what)
    _write_state(workdir, plan.spec.name, {**state, "tune_names": state["tune_names"] + names})  # a kill now resumes them
    return [tuner.fit() for tuner in _tuners(plan, context, workdir, names, False, progress, slots=missing, topup=round_)]


def best_trial(result: SweepResult, mode: str) -> dict[str, Any] | None:
    """The finished trial with the best value of the search metric (what Optuna / ASHA optimise),
    or None when no finished trial reported it."""
    scored = [t for t in result.trials if t["status"] == "FINISHED" and t.get("score") is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda t: t["score"])


def _record_best_trial(parent_run, result: SweepResult, metric: str, mode: str) -> None:
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


def _reconcile(client, uri: str, name: str, exp_id: str, parent_id: str, grids, metric: str = "val/mIoU") -> SweepResult:
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
            tid, slot = (res.metrics or {}).get("trial_id"), _slot_of(res)
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
