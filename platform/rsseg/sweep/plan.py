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

from rsseg.config.loader import Document, _unwrap, format_validation_error
from rsseg.config.resolve import LoadedSweep
from rsseg.config.specs import Axis, RunSpecBase, run_spec_model
from rsseg.errors import ConfigError
from rsseg.provenance import fingerprint


@dataclass(frozen=True)
class PlannedTrial:
    values: dict[str, Any]  # dotted path -> value (grid values; searched axes are added per trial)
    run: dict[str, Any]  # the resolved run spec (JSON)
    key: str  # stable identity of the trial's resolved spec (MLflow tag trial_key)
    pretrain_fingerprint: str | None


@dataclass(frozen=True)
class PlannedPretraining:
    fingerprint: str
    run: dict[str, Any]
    cached: bool
    summary: str


@dataclass
class SweepPlan:
    loaded: LoadedSweep
    grid_axes: list[str]
    search_axes: dict[str, Axis]
    cells: list[dict[str, Any]]  # grid points
    trials: list[PlannedTrial]  # grid algorithm: every trial; optuna: one per cell (search axes at base values)
    pretrainings: list[PlannedPretraining]
    skipped: list[tuple[dict[str, Any], str]] = field(default_factory=list)

    @property
    def spec(self):
        return self.loaded.spec

    @property
    def n_trials(self) -> int:
        return len(self.cells) * self.spec.search.num_samples

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


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    target = doc
    for p in parts[:-1]:
        if not isinstance(target.get(p), dict):
            target[p] = {}
        target = target[p]
    target[parts[-1]] = copy.deepcopy(value)


def build_run(base: dict[str, Any], values: dict[str, Any]) -> RunSpecBase:
    doc = copy.deepcopy(base)
    for path, value in values.items():
        set_path(doc, path, value)
    return run_spec_model().model_validate(doc)


def search_key(path: str) -> str:
    """Optuna parameter name of a dotted path (Tune treats '/' and nested keys specially)."""
    return "s__" + path.replace(".", "__")


def trial_key(run: dict[str, Any]) -> str:
    return fingerprint({k: v for k, v in run.items() if k not in ("tracking", "name")})


def make_plan(loaded: LoadedSweep) -> SweepPlan:
    from rsseg.methods import registry
    from rsseg.pretrain import store

    spec, path = loaded.spec, loaded.path
    model = run_spec_model()
    for key in spec.space:
        ok, valid = field_exists(model, key)
        if not ok:
            close = difflib.get_close_matches(key.split(".")[-1], valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(key.split('.')[:-1] + [close[0]])!r}?" if close else ""
            raise ConfigError(f"{path}: space.{key}: not a key of the run spec (base){hint}")
    grid_axes = [k for k, a in spec.space.items() if a.kind == "grid"]
    search_axes = {k: a for k, a in spec.space.items() if a.kind != "grid"}
    if spec.search.algorithm == "grid" and search_axes:
        bad = next(iter(search_axes))
        raise ConfigError(f"{path}: space.{bad}: {search_axes[bad].kind} needs search.algorithm: optuna (grid search takes grid axes only)")
    if spec.search.algorithm == "optuna" and spec.search.asha is None and not search_axes and not grid_axes:
        raise ConfigError(f"{path}: space: an optuna search needs at least one axis")
    base = loaded.base.model_dump(mode="json", by_alias=True)
    methods = registry()
    cells, trials, skipped = [], [], []
    seen_fps: dict[str, PlannedPretraining] = {}
    for combo in itertools.product(*(spec.space[k].grid for k in grid_axes)) if grid_axes else [()]:
        values = dict(zip(grid_axes, combo))
        method = values.get("method", base.get("method"))
        if method not in methods:
            skipped.append((values, f"method {method!r} is not installed (no rsseg.methods entry point); its trials are skipped"))
            continue
        try:
            run = build_run(base, values)
        except ValidationError as exc:
            doc = Document(data={}, origin=str(path))
            inner = format_validation_error(exc, model, doc)
            where = ", ".join(f"{k}={v!r}" for k, v in values.items())
            axis = next(iter(values)) if values else "base"
            raise ConfigError(f"{path}: space.{axis}: the trial {where} is invalid: {str(inner).split(': ', 1)[1]}") from None
        run_json = run.model_dump(mode="json", by_alias=True)
        fp = None
        m = methods[method]
        if m.needs_pretraining(run):
            fp = store.fingerprint(run)
            if fp not in seen_fps:
                it = run.pretrain.iterations.counts()
                seen_fps[fp] = PlannedPretraining(fp, run_json, store.find(run) is not None,
                                                  f"{method}, {sum(it)} iterations ({it[0]} archive + {it[1]} homogeneous), "
                                                  f"{run.pretrain.runtime.workers} worker(s)")
        cells.append(values)
        trials.append(PlannedTrial(values, run_json, trial_key(run_json), fp))
    if not cells:
        raise ConfigError(f"{path}: every trial was skipped ({skipped[0][1] if skipped else 'empty grid'})")
    return SweepPlan(loaded, grid_axes, search_axes, cells, trials, list(seen_fps.values()), skipped)


def _fmt(v: Any) -> str:
    return "[" + ", ".join(_fmt(x) for x in v) + "]" if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)


def describe(plan: SweepPlan) -> str:
    s = plan.spec
    search = s.search
    lines = [
        f"sweep {s.name}" + (f" (fills {s.table})" if s.table else "") + f" — {plan.loaded.path}"
        + (f", profile {plan.loaded.profile}" if plan.loaded.profile else ""),
        f"search: {search.algorithm}, {plan.n_trials} trials"
        + (f" ({len(plan.cells)} grid cells x {search.num_samples} samples)" if search.algorithm == "optuna" else "")
        + f", max {search.max_concurrent or 'unlimited'} concurrent, per trial {search.resources.cpu:g} CPU / {search.resources.gpu:g} GPU"
        + (f", ASHA (grace {search.asha.grace_period}, factor {search.asha.reduction_factor:g})" if search.asha else "")
        + f", metric {search.metric} ({search.mode})",
    ]
    if plan.search_axes:
        lines.append("searched (optuna): " + ", ".join(f"{k} {a.kind} {_fmt(getattr(a, a.kind if a.kind != 'int' else 'integer'))}" for k, a in plan.search_axes.items()))
    cols = plan.grid_axes or ["(base)"]
    widths = [max(len(c), *(len(_fmt(t.values.get(c, ""))) for t in plan.trials)) for c in cols]
    lines.append("")
    lines.append("  #   " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)) + "  trial key         pre-training")
    for i, t in enumerate(plan.trials, 1):
        cells = "  ".join(_fmt(t.values.get(c, "")).ljust(w) for c, w in zip(cols, widths))
        lines.append(f"  {i:<3d} {cells}  {t.key}  {t.pretrain_fingerprint or '-'}")
    lines.append("")
    lines.append(f"pre-trainings needed: {len(plan.pretrainings)}")
    for p in plan.pretrainings:
        lines.append(f"  {p.fingerprint}  {'cached' if p.cached else 'to train'}  {p.summary}")
    if plan.skipped:
        by_reason: dict[str, int] = {}
        for _, reason in plan.skipped:
            by_reason[reason] = by_reason.get(reason, 0) + 1
        lines.append(f"skipped: {len(plan.skipped)} grid cells")
        for reason, n in by_reason.items():
            lines.append(f"  {n} x {reason}")
    return "\n".join(lines) + "\n"
