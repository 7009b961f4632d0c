"""SweepSpec -> a plan: the expanded trials, the pre-trainings they need, what is skipped.

Grid axes are expanded here (cartesian product, in the order of ``space``); the other axes
(choice, uniform, loguniform, int) are searched by Optuna inside each grid cell. Every grid value
is validated by building the trial's full run spec, so a bad value fails the plan, naming the
sweep file and the ``space`` key, before anything runs. Trials of methods that are not installed
(baselines a later release adds) are skipped with a message instead of failing the sweep.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from rsseg.config.loader import Document, _unwrap, format_validation_error, set_path
from rsseg.config.specs import Axis, RunSpecBase
from rsseg.errors import ConfigError
from rsseg.provenance import fingerprint
from rsseg.resolved import ResolvedRun, resolve
from rsseg.runspec import LoadedSweep, run_spec_model


@dataclass(frozen=True)
class PlannedTrial:
    values: dict[str, Any]  # dotted path -> value (grid values; searched axes are added per trial)
    resolved: ResolvedRun  # the trial's run, resolved once here: what the Tune trial receives
    network: str = ""  # the method's network (UNet preset, backbone)
    params: tuple[int, int] | None = None  # (encoder, head + neck) parameters, counted on the meta device
    trainable: int | None = None

    @property
    def spec(self) -> RunSpecBase:
        return self.resolved.spec

    @property
    def run(self) -> dict[str, Any]:
        """The run spec's JSON (what Optuna's samples are overlaid on)."""
        return self.resolved.spec.model_dump(mode="json", by_alias=True)

    @property
    def key(self) -> str:
        """Stable identity of the trial's resolved spec (MLflow tag trial_key)."""
        return self.resolved.key

    @property
    def pretrain_fingerprint(self) -> str | None:
        return self.resolved.fingerprint

    def cell(self, index: int) -> dict[str, Any]:
        """What travels in Tune's config: the grid values (for names and tags) and the trial's
        place in the plan; the resolved run itself travels beside it (`tune.with_parameters`)."""
        return {"values": self.values, "index": index}


@dataclass(frozen=True)
class PlannedPretraining:
    fingerprint: str
    resolved: ResolvedRun  # a run that needs this pre-training (the first planned one)
    cached: bool
    summary: str

    @property
    def spec(self) -> RunSpecBase:
        return self.resolved.spec


@dataclass
class SweepPlan:
    loaded: LoadedSweep
    grid_axes: list[str]
    search_axes: dict[str, Axis]
    trials: list[PlannedTrial]  # one per grid cell (optuna: searched axes at the base values, overlaid per trial)
    pretrainings: list[PlannedPretraining]
    skipped: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # data that is not there: shown by a dry run, fatal when the sweep starts

    @property
    def spec(self):
        return self.loaded.spec

    @property
    def n_trials(self) -> int:
        return len(self.trials) * self.spec.search.num_samples

    def identity(self) -> str:
        """What a resume must match: the trials and the search settings."""
        return fingerprint({"trials": [t.key for t in self.trials], "search": self.spec.search.model_dump(mode="json"),
                            "space": {k: v.model_dump(mode="json", by_alias=True) for k, v in self.search_axes.items()}})


def field_exists(model: type[BaseModel], path: str) -> tuple[bool, list[str]]:
    """Whether a dotted path names a field of the run spec; else the valid keys at the failing level."""
    tp: Any = model
    for part in path.split("."):
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fields = {**tp.model_fields, **{f.alias: f for f in tp.model_fields.values() if f.alias}}
            if part not in fields:
                return False, sorted(tp.model_fields)
            tp = fields[part].annotation
        elif typing.get_origin(tp) in (dict, typing.Dict):
            tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        else:
            return False, []
    return True, []


def overlay(run: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a run spec's JSON with dotted-path values set (grid cells, Optuna samples)."""
    doc = copy.deepcopy(run)
    for path, value in values.items():
        set_path(doc, path, value)
    return doc


def build_run(base: dict[str, Any], values: dict[str, Any]) -> RunSpecBase:
    return run_spec_model().model_validate(overlay(base, values))


def search_key(path: str) -> str:
    """Optuna parameter name of a dotted path (Tune treats '/' and nested keys specially)."""
    return "s__" + path.replace(".", "__")


def plan_bands(data) -> int:
    """The input bands a planned network is counted with: the declared ones (`DataSpec.declared_bands`),
    3 for a folder dataset whose rasters are not read at planning."""
    return data.declared_bands or 3


def _classes(data) -> int | None:
    from rsseg.data.registry import class_table

    try:
        return class_table(data).num_classes
    except Exception:  # noqa: BLE001 - a folder dataset without its root: counted as unknown
        return None


def network_summary(res: ResolvedRun) -> tuple[str, tuple[int, int] | None, int | None]:
    """(network name, (encoder, head) parameters, trainable parameters) of a planned (resolved) run."""
    run, tags = res.spec, res.method_tags
    network = tags.get("unet") or tags.get("backbone") or run.method
    classes = _classes(run.data)
    counts = run.plugin.parameter_counts(run, plan_bands(run.data), classes, res.head) if classes else None
    trainable = None if counts is None else counts[1] + (0 if run.finetune.frozen else counts[0])
    return network, counts, trainable


def _check_space(spec, path, model) -> None:
    """Every axis names run-spec keys (cases: each of theirs); grid vs searched axes fit the algorithm."""
    for key, axis in spec.space.items():
        for where, path_key in ([(f"space.{key}", key)] if axis.kind != "cases" else
                                [(f"space.{key}.cases[{i}].{k}", k) for i, c in enumerate(axis.cases) for k in c if k != "name"]):
            ok, valid = field_exists(model, path_key)
            if not ok:
                close = difflib.get_close_matches(path_key.split(".")[-1], valid, n=1, cutoff=0.5)
                hint = f"; did you mean {'.'.join(path_key.split('.')[:-1] + [close[0]])!r}?" if close else ""
                raise ConfigError(f"{path}: {where}: not a key of the run spec (base){hint}")
    searched = [k for k, a in spec.space.items() if not a.planned]
    if spec.search.algorithm == "grid" and searched:
        bad = searched[0]
        raise ConfigError(f"{path}: space.{bad}: {spec.space[bad].kind} needs search.algorithm: optuna (grid search takes grid axes only)")
    if spec.search.algorithm == "optuna" and spec.search.asha is None and not spec.space:
        raise ConfigError(f"{path}: space: an optuna search needs at least one axis")


def _validated(base: dict[str, Any], sets: dict[str, Any], path, model) -> RunSpecBase:
    try:
        return build_run(base, sets)
    except ValidationError as exc:
        inner = format_validation_error(exc, model, Document(data={}, origin=str(path)))
        where = ", ".join(f"{k}={v!r}" for k, v in sets.items())
        axis = next(iter(sets)) if sets else "base"
        raise ConfigError(f"{path}: space.{axis}: the trial {where} is invalid: {str(inner).split(': ', 1)[1]}") from None


def make_plan(loaded: LoadedSweep, workdir=None, networks: bool = False) -> SweepPlan:
    """The sweep's trials and pre-trainings, every check that needs nothing started. ``networks``
    also counts each trial's parameters (on the meta device) for `describe`: `--dry-run` shows them;
    a running sweep does not, and skips the seconds of diffusers imports they cost its driver."""
    from rsseg.device import check_sweep_resources
    from rsseg.methods import registry
    from rsseg.checkpoints import store

    spec, path = loaded.spec, loaded.path
    model = run_spec_model()
    _check_space(spec, path, model)
    grid_axes = [k for k, a in spec.space.items() if a.planned]
    search_axes = {k: a for k, a in spec.space.items() if not a.planned}
    try:
        check_sweep_resources(loaded.base.runtime.device, spec.search.resources.gpu, None)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = loaded.base.model_dump(mode="json", by_alias=True)
    methods = registry()
    trials, skipped = [], []
    seen_fps: dict[str, PlannedPretraining] = {}
    preflighted: set[str] = set()
    summaries: dict[str, tuple] = {}
    for combo in itertools.product(*(spec.space[k].cells(k) for k in grid_axes)) if grid_axes else [()]:
        values = {k: shown for k, (shown, _) in zip(grid_axes, combo)}
        sets = {dotted: v for _, setting in combo for dotted, v in setting.items()}
        method = sets.get("method", base.get("method"))
        if method not in methods:
            skipped.append((values, f"method {method!r} is not installed (no rsseg.methods entry point); its trials are skipped"))
            continue
        run = _validated(base, sets, path, model)
        reason = run.plugin.unavailable_reason(run)
        if reason:
            skipped.append((values, reason))
            continue
        block = run.method_block.model_dump_json() if run.method_block is not None else ""
        if run.method + block not in preflighted:  # slow checks (reading weights files) once per method setting
            preflighted.add(run.method + block)
            for key, message in run.plugin.preflight_problems(run)[:1]:
                raise ConfigError(f"{path}: {key}: {message}")
        res = resolve(run, loaded.profile)
        run_json = run.model_dump(mode="json", by_alias=True)
        net_key = fingerprint({k: run_json[k] for k in ("method", "data", "finetune", run.plugin.block or "method") if k in run_json})
        if networks and net_key not in summaries:
            summaries[net_key] = network_summary(res)
        fp = res.fingerprint
        if fp is not None and fp not in seen_fps:
            it = res.pretraining.counts
            seen_fps[fp] = PlannedPretraining(fp, res, store.find(run, workdir) is not None,
                                              f"{method}, {sum(it)} iterations ({it[0]} archive + {it[1]} homogeneous), "
                                              f"{run.pretrain.runtime.workers} worker(s)")
        trials.append(PlannedTrial(values, res, *summaries.get(net_key, ())))
    if not trials:
        raise ConfigError(f"{path}: every trial was skipped ({skipped[0][1] if skipped else 'empty grid'})")
    _check_searched_pretraining(search_axes, trials, path)
    return SweepPlan(loaded, grid_axes, search_axes, trials, list(seen_fps.values()), skipped, _data_problems(trials, seen_fps.values()))


def _data_problems(trials: list[PlannedTrial], pretrainings) -> list[str]:
    """Every trial reads its dataset; only a pre-training still to do reads its other imagery (one
    already in the store, trained on another machine or before the archive folder moved, needs none)."""
    from rsseg.pretrain.data import data_problems, dataset_problems

    datasets = {t.spec.data.model_dump_json(): t.spec.data for t in trials}
    return list(dict.fromkeys([*(p for data in datasets.values() for p in dataset_problems(data)),
                               *(p for pre in pretrainings if not pre.cached for p in data_problems(pre.spec))]))


def _bounds(axis: Axis) -> list[Any]:
    """Two values of a searched axis far apart (its ends): enough to see what it changes."""
    if axis.kind == "choice":
        return [axis.choice[0], axis.choice[-1]]
    if axis.kind == "int":
        return list(axis.integer)
    return list(getattr(axis, axis.kind))


def _check_searched_pretraining(search_axes: dict[str, Axis], trials: list[PlannedTrial], path) -> None:
    """Optuna samples inside trials, which hold no resources for a pre-training: an axis that
    changes the pre-training (its fingerprint) is refused here, before anything starts."""
    for trial in trials:
        if trial.pretrain_fingerprint is None:
            continue
        for key, axis in search_axes.items():
            fps = set()
            for value in _bounds(axis):
                try:
                    fps.add(build_run(trial.run, {key: value}).pretrain_fingerprint)
                except Exception:  # noqa: BLE001 - an invalid end value is the trial's own error later
                    continue
            if len(fps) > 1:
                raise ConfigError(f"{path}: space.{key}: {axis.kind} (searched by Optuna) changes the pre-training, which must be "
                                  "planned before the trials start; make it a grid axis (each value's pre-training is then "
                                  "trained once, before any trial)")
        return  # one planned trial stands for the others: the axes are the same


def trunk_plan(plan: "SweepPlan", workdir=None) -> list[str]:
    """The dry run's lines on trunks: per shared archive phase, its branch points and the
    iterations to train, and the sweep's total against training every pre-training alone."""
    return _pretraining_work(plan, workdir)[0]


def pretraining_work(plan: "SweepPlan", workdir=None) -> list[tuple[Any, int]]:
    """(a run of the pre-training, iterations still to train) for each trunk and each
    pre-training trained on its own: what the sweep's pre-training stage computes."""
    return _pretraining_work(plan, workdir)[1]


def _pretraining_work(plan: "SweepPlan", workdir=None) -> tuple[list[str], list[tuple[Any, int]]]:
    from rsseg.checkpoints import store
    from rsseg.workdir import Workdir

    workdir = workdir or Workdir.resolve()
    todo = [p for p in plan.pretrainings if not p.cached]
    naive = sum(p.spec.pretrain.iterations.n_total for p in todo)
    groups: dict[str, list] = {}
    solo = []
    for p in todo:
        lin = p.resolved.pretraining.lineage
        if lin.trunk:
            groups.setdefault(lin.trunk, []).append((p, lin))
        else:
            solo.append((p, lin.why))
    lines, total, work = [], 0, []
    for trunk, members in groups.items():
        method = members[0][0].spec.method
        longest = max(lin.switch for _, lin in members)
        have = store.latest_trunk_point(store.trunk_dir(workdir, method, trunk), trunk, longest, verify=False) if workdir.root.is_dir() else None
        start = have[0] if have else 0
        if len(members) == 1 and not start:  # nothing to share with (yet): later runs can branch from it
            solo.append((members[0][0], f"its archive phase is trunk {trunk[:8]}: later runs branch from it"))
            continue
        branch_its = sum(lin.homogeneous for _, lin in members)
        total += (longest - start) + branch_its
        work.append((members[0][0].spec, (longest - start) + branch_its))
        points = sorted({lin.switch for _, lin in members})
        lines.append(f"  trunk {trunk}  archive to step {longest:,}" + (f" (from its point at {start:,} in the store)" if start else "")
                     + f"; branch points {', '.join(f'{x:,}' for x in points)}; {longest - start:,} to train")
        lines.append(f"    {len(members)} pre-training(s) on it (the longest trains it first): {branch_its:,} iterations after their switch")
    for p, why in solo:
        total += p.spec.pretrain.iterations.n_total
        work.append((p.spec, p.spec.pretrain.iterations.n_total))
        lines.append(f"  on its own  {p.fingerprint}  {p.spec.pretrain.iterations.n_total:,} iterations ({why})")
    if not todo:
        return [], []
    head = [f"pre-training iterations to train: {total:,} (training each of the {len(todo)} alone: {naive:,})"]
    return head + lines, work


def _fmt(v: Any) -> str:
    return "[" + ", ".join(_fmt(x) for x in v) + "]" if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M"


def _params(t: PlannedTrial) -> str:
    if t.params is None:
        return "?"
    return f"{_millions(t.params[0])} / {_millions(t.params[1])} ({_millions(t.trainable)})"


def describe(plan: SweepPlan) -> str:
    s = plan.spec
    search = s.search
    lines = [
        f"sweep {s.name}" + (f" (fills {s.table})" if s.table else "") + f" — {plan.loaded.path}"
        + (f", profile {plan.loaded.profile}" if plan.loaded.profile else ""),
        f"search: {search.algorithm}, {plan.n_trials} trials"
        + (f" ({len(plan.trials)} grid cells x {search.num_samples} samples)" if search.algorithm == "optuna" else "")
        + f", max {search.max_concurrent or 'unlimited'} concurrent, per trial {search.resources.cpu:g} CPU / {search.resources.gpu:g} GPU"
        + (f", ASHA (grace {search.asha.grace_period}, factor {search.asha.reduction_factor:g})" if search.asha else "")
        + f", metric {search.metric} ({search.mode})",
    ]
    if plan.search_axes:
        lines.append("searched (optuna): " + ", ".join(f"{k} {a.kind} {_fmt(getattr(a, a.kind if a.kind != 'int' else 'integer'))}" for k, a in plan.search_axes.items()))
    cols = plan.grid_axes or ["(base)"]
    widths = [max(len(c), *(len(_fmt(t.values.get(c, ""))) for t in plan.trials)) for c in cols]
    device = f"{plan.loaded.base.runtime.device}" + (f" ({search.resources.gpu:g} GPU)" if search.resources.gpu else "")
    nets = [t.network for t in plan.trials]
    nw = max(len("network"), *(len(n) for n in nets))
    params = [_params(t) for t in plan.trials]
    pw = max(len("params enc / head (trainable)"), *(len(p) for p in params))
    dw = max(len("device"), len(device))
    lines.append("")
    lines.append("  #   " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)) + f"  {'device'.ljust(dw)}  {'network'.ljust(nw)}  "
                 f"{'params enc / head (trainable)'.ljust(pw)}  trial key         pre-training")
    for i, (t, par) in enumerate(zip(plan.trials, params), 1):
        cells = "  ".join(_fmt(t.values.get(c, "")).ljust(w) for c, w in zip(cols, widths))
        lines.append(f"  {i:<3d} {cells}  {device.ljust(dw)}  {t.network.ljust(nw)}  {par.ljust(pw)}  {t.key}  {t.pretrain_fingerprint or '-'}")
    lines.append("")
    lines.append(f"pre-trainings needed: {len(plan.pretrainings)}")
    for p in plan.pretrainings:
        lines.append(f"  {p.fingerprint}  {'cached' if p.cached else 'to train'}  {p.summary}")
    lines += trunk_plan(plan)
    if plan.problems:
        lines.append(f"problems (the sweep stops on them before it starts anything): {len(plan.problems)}")
        lines += [f"  {p}" for p in plan.problems]
    if plan.skipped:
        by_reason: dict[str, int] = {}
        for _, reason in plan.skipped:
            by_reason[reason] = by_reason.get(reason, 0) + 1
        lines.append(f"skipped: {len(plan.skipped)} grid cells")
        for reason, n in by_reason.items():
            lines.append(f"  {n} x {reason}")
    return "\n".join(lines) + "\n"


def grid_cells(plan: SweepPlan) -> dict[str, dict[str, Any]]:
    """Every grid trial by its slot (``<cell>.<repeat>``): what a trial is, whichever Tuner runs it."""
    return {f"{i}.{r}": {**t.cell(i), "slot": f"{i}.{r}"}
            for r in range(plan.spec.search.num_samples) for i, t in enumerate(plan.trials)}
