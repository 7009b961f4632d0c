"""The sweep driver: MLflow parent run, pre-trainings, Ray Tune, resume (its files: `rsseg.sweep.state`;
MLflow as the record once Tune returns: `rsseg.sweep.record`).

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

import datetime as dt
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rsseg import kernels, tracking
from rsseg.errors import ConfigError, SweepError
from rsseg.sweep import report
from rsseg.sweep.plan import SweepPlan, grid_cells, make_plan, search_key
from rsseg.sweep.record import (SweepResult, best_trial, close_interrupted, mark_interrupted, missing_slots, reconcile,
                                record_best_trial)
from rsseg.sweep.state import check_owner, private_storage, read_state, state_path, sweep_lock, write_state
from rsseg.workdir import Workdir

log = logging.getLogger(__name__)

def _pretrain_all(plan: SweepPlan, workdir: Workdir, uri: str, progress: bool) -> None:
    """Each distinct pre-training once; several at a time when the cluster has the CPUs."""
    from rsseg import raycluster
    from rsseg.checkpoints import store
    from rsseg.pretrain.ensure import ensure_pretrained

    runs = [p.resolved for p in plan.pretrainings if store.find(p.spec, workdir) is None]
    if not runs:
        return
    parallel = min(raycluster.concurrent_pretrainings(r.spec.pretrain.runtime, r.spec.runtime.device, len(runs)) for r in runs)
    trunks, branches = trunk_order(runs)
    if progress:
        from rsseg.progress import line

        line(f"pre-training {len(runs)} model(s) first ({parallel} at a time): " + ", ".join(r.fingerprint for r in runs)
             + (f"; {len(trunks)} trunk(s) first, then the runs branching from them" if trunks else ""), final=True)

    def one(item):
        run, switch_steps = item
        return ensure_pretrained(run, workdir, tracking_uri=uri, progress=progress and parallel == 1,
                                 tags={"sweep": plan.spec.name}, concurrent=parallel, switch_steps=switch_steps)

    for stage in (trunks, branches):  # the branches start from the points the trunks left
        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(stage)))) as pool:
            for f in [pool.submit(one, item) for item in stage]:
                f.result()
    if progress:
        from rsseg.progress import done

        done()


def trunk_order(runs: list) -> tuple[list[tuple[Any, tuple[int, ...]]], list[tuple[Any, tuple[int, ...]]]]:
    """(first, then): per trunk, the (resolved) run that goes furthest along it trains first and
    leaves a point at every switch step of the others; they then start from those points. Runs
    of no trunk (or alone on theirs) are in ``then`` and run beside the branches."""
    groups: dict[str, list] = {}
    first, then = [], []
    for run in runs:
        lin = run.pretraining.lineage
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
    # the planned runs, resolved once by the planner, travel beside the config (the object store):
    # a trial takes its own by the cell's index and re-derives nothing
    runs = tuple(t.resolved for t in plan.trials)
    trainable = tune.with_resources(tune.with_parameters(trial_fn, context=context, runs=runs), {"cpu": res.cpu, "gpu": res.gpu})
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
            space = {"cell": plan.trials[index].cell(index)}
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
    previous = read_state(workdir, spec.name)
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
        _pretrain_all(plan, workdir, uri, progress)
        parent_run.set_tags({"pretrain_fingerprints": ",".join(p.fingerprint for p in plan.pretrainings)})
        context = {
            "sweep": spec.name, "table": spec.table or "",
            "workdir": str(workdir.root), "storage": workdir.storage_arg,
            "uri": uri, "experiment": spec.name, "parent_run_id": parent_id,
            "threads": max(1, int(spec.search.resources.cpu)),
            "metric": spec.search.metric, "mode": spec.search.mode, "driver_pid": os.getpid(),
            "search_axes": {k: v.model_dump(mode="json", by_alias=True) for k, v in plan.search_axes.items()},
        }
        grids = _fit_all(plan, context, workdir, tune_names, resume, progress, client, exp_id, parent_id)
        if progress:
            from rsseg.progress import done

            done()
        result = reconcile(client, uri, spec.name, exp_id, parent_id, grids, spec.search.metric)
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
        check_owner(workdir, spec.name, previous["tune_names"])
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
            close_interrupted(client, previous, spec.name)
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
        write_state(workdir, spec.name, {"parent_run_id": parent_id, "experiment_id": exp_id, "uri": uri,
                                          "tune_names": tune_names, "plan": plan.identity(), "profile": loaded.profile,
                                          "sweep_file": str(loaded.path), "started": stamp})
    return parent_id, tune_names


def _preflight(plan: SweepPlan, uri: str, workdir: Workdir) -> None:
    """On a cluster of several nodes, every node reaches the tracking server, the storage and the
    data the trials and the pre-trainings still to do read (`rsseg.clustercheck`)."""
    from rsseg import clustercheck
    from rsseg.checkpoints import store

    if len(clustercheck.alive_nodes()) < 2:
        return
    pending = [p.spec for p in plan.pretrainings if store.find(p.spec, workdir) is None]
    clustercheck.preflight(uri, workdir, clustercheck.run_paths([t.spec for t in plan.trials], pending))


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
        mark_interrupted(client, exp_id, parent_id)
        raise
    return grids


def _summarise(parent_run, result: SweepResult, spec) -> None:
    """The parent run's record of the outcome: counts, the winner (on the search metric), the
    sweep's table and chart (`report`)."""
    parent_run.log_metrics({"trials_finished": result.finished, "trials_failed": result.failed})
    record_best_trial(parent_run, result, spec.search.metric, spec.search.mode)
    best = best_trial(result, spec.search.mode)
    report.log(parent_run, result.trials, list(spec.space), best["run_id"] if best else None, spec.name,
               {k: [str(v) for v in a.grid] for k, a in spec.space.items() if a.grid is not None})


def _top_up(plan: SweepPlan, context: dict[str, Any], workdir: Workdir, client, exp_id: str, parent_id: str, grids,
            progress: bool) -> list:
    """Run, in new Tune experiments, what the restored ones lost (see the module's docstring)."""
    missing = missing_slots(plan, client, exp_id, parent_id, grids)
    if not missing:
        return []
    state = read_state(workdir, plan.spec.name)
    round_ = 1 + sum(1 for n in state["tune_names"] if "-topup" in n)
    base = f"{plan.spec.name}-{state['started']}-topup{round_}"
    if plan.spec.search.algorithm == "grid":
        names, what = [base], f"{len(missing)} grid trial(s): " + ", ".join(missing)
    else:
        names = [f"{base}-cell{i}" for i, _ in missing]
        what = ", ".join(f"{n} sample(s) of cell {i}" for i, n in missing)
    log.warning("sweep %s: %s not ended after the restored Tune experiment(s); running them again (each from its "
                "resume state)", plan.spec.name, what)
    write_state(workdir, plan.spec.name, {**state, "tune_names": state["tune_names"] + names})  # a kill now resumes them
    return [tuner.fit() for tuner in _tuners(plan, context, workdir, names, False, progress, slots=missing, topup=round_)]
