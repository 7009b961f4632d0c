"""A run resolved once: the validated spec and everything derived from it.

The planner (one per grid cell) and every single-run command (``platform finetune``,
``pretrain``, ``evaluate``) call `resolve` once; the stages below — the tracked runner, the
fine-tuning, the pre-training launch and its Ray Train workers, the sweep trials — receive the
`ResolvedRun` (pickled as it is: no re-parse, no re-validation) and derive nothing: the head, the
pre-training's fingerprint, iteration counts and trunk lineage, the trial key, the method's tags,
the commit and the run tags are read from it. Only what depends on the node a stage runs on is
decided there: the torch device Ray's GPU grant binds (`rsseg.device.resolve`) and the bands of a
folder dataset's rasters.

A stage given a bare spec (a library caller, a test) resolves it at its entry, through `of`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from rsseg.checkpoints.identity import Lineage, identity, lineage
from rsseg.config.specs import RunSpecBase
from rsseg.provenance import fingerprint, git_commit, package_version
from rsseg.runtags import RunTags, ratio_tag


@dataclass(frozen=True)
class ResolvedPretraining:
    """The pre-training a run's weights come from."""

    fingerprint: str  # the store's key: the hash of ``identity``
    identity: dict[str, Any]  # what its result depends on (rsseg.checkpoints.identity)
    lineage: Lineage  # its trunk, switch step and homogeneous iterations
    counts: tuple[int, int]  # (archive, homogeneous) iterations
    share: float  # the homogeneous share as the user wrote it (Fig. 9/10's key)
    source: str  # the dataset of step 2 when it is not the target's own, else ""


@dataclass(frozen=True)
class ResolvedRun:
    spec: RunSpecBase
    profile: str  # the config profile it was loaded with ("" for none)
    head: str  # finetune.head with ``auto`` resolved by the method
    key: str  # what the run computes (the MLflow tag trial_key; rsseg.sweep re-runs count once)
    config: dict[str, Any]  # the config that shapes the run, as its MLflow params show it (RunSpec.active_config)
    config_fingerprint: str  # the hash of the whole validated spec (the MLflow param run_fingerprint)
    pretraining: ResolvedPretraining | None  # None: the method is not pre-trained by the platform
    git_commit: str = ""
    version: str = ""

    @functools.cached_property
    def method_tags(self) -> dict[str, str]:
        """The method's own tags (`Method.tag_keys`), resolved on first use, once per run: DDPM's
        read the noise schedule from diffusers (2-3 s of imports), which a sweep driver whose
        pre-trainings are in the store never otherwise pays; its trials import it anyway."""
        return {k: str(v) for k, v in self.spec.plugin.run_tags(self.spec).items()}

    @property
    def fingerprint(self) -> str | None:
        """The pre-training's fingerprint, None when there is none."""
        return self.pretraining.fingerprint if self.pretraining is not None else None

    def tags(self, kind: str, **extra: Any) -> RunTags:
        """The run's tags: a pure function of the resolved run. ``extra`` sets the sweep fields
        (table, trial_id, ...); the ratios are the values the user wrote, spelled by `ratio_tag`."""
        run = self.spec
        values: dict[str, Any] = dict(
            kind=kind, method=run.method, dataset=run.data.dataset, profile=self.profile, git_commit=self.git_commit,
            label_ratio=ratio_tag(run.data.label_ratio), frozen=str(run.finetune.frozen).lower(), seed=str(run.seed),
            method_tags=dict(self.method_tags),
        )
        if kind == "pretrain":
            values.update(label_ratio="", frozen="", seed="")
        if (pre := self.pretraining) is not None:
            lin = pre.lineage
            values.update(pretrain_fingerprint=pre.fingerprint, homogeneous_share=ratio_tag(pre.share), homogeneous_source=pre.source,
                          trunk_fingerprint=lin.trunk or "", switch_step=str(lin.switch) if lin.trunk else "")
        values.update({k: (v if isinstance(v, dict) else str(v)) for k, v in extra.items() if v is not None})
        return RunTags(**values)


def trial_key(run: RunSpecBase, active: dict[str, Any]) -> str:
    """What the run computes, not how or where: its ``active`` config (its own method block and
    head, so installing another method leaves the key alone) without name and runtime, and the
    identity of the weights it starts from (the pre-training fingerprint)."""
    what = {k: v for k, v in active.items() if k not in ("name", "runtime")}
    if run.needs_pretraining:
        what["pretraining"] = run.pretrain_fingerprint
    return fingerprint(what)


def _pretraining(run: RunSpecBase) -> ResolvedPretraining | None:
    if not run.needs_pretraining:
        return None
    lin = lineage(run)
    other = run.pretrain.homogeneous_data
    return ResolvedPretraining(run.pretrain_fingerprint, identity(run), lin, run.pretrain.iterations.counts(),
                               run.pretrain.iterations.homogeneous_share,
                               other.dataset if other is not None and lin.homogeneous else "")


def resolve(run: RunSpecBase, profile: str | None = None) -> ResolvedRun:
    """Everything a run's stages need, derived here once from its validated spec."""
    active = run.active_config()
    return ResolvedRun(spec=run, profile=profile or "", head=run.head_name, key=trial_key(run, active), config=active,
                       config_fingerprint=fingerprint(run.model_dump(mode="json")), pretraining=_pretraining(run),
                       git_commit=git_commit(), version=package_version())


def of(run: RunSpecBase | ResolvedRun, profile: str | None = None) -> ResolvedRun:
    """A stage's entry: the resolved run it was given, or a bare spec (a library caller) resolved now."""
    return run if isinstance(run, ResolvedRun) else resolve(run, profile)
