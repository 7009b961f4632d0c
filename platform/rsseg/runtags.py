"""The one MLflow run-tag schema: written by every run (pre-training, fine-tuning, sweep trial,
evaluation), read back by the tables. Tables are queries on these tags, so the names are the
contract; a method adds its own setting tags (timesteps, backbone, ...) under the names it
declares in `Method.tag_keys`. A run's tags are made from its resolved run (`rsseg.resolved.ResolvedRun.tags`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

def ratio_tag(value: float) -> str:
    """How a ratio is spelled in the tags (0.02, 0.4, 1): the one spelling the tables' keys use too."""
    return f"{value:g}"


@dataclass(frozen=True)
class RunTags:
    kind: str  # "pretrain" | "finetune" | "sweep" | "evaluate"
    method: str = ""
    dataset: str = ""
    profile: str = ""
    git_commit: str = ""
    table: str = ""  # which paper table / figure the run fills (sweep trials)
    sweep: str = ""
    sweep_parent: str = ""
    trial_id: str = ""  # Tune's id of the trial's latest attempt
    trial_slot: str = ""  # the trial's place in the sweep (grid: cell.repeat; optuna: cell:trial id): its identity across resumes
    trial_key: str = ""  # fingerprint of the trial's resolved spec: re-runs count once
    attempt: str = ""
    label_ratio: str = ""
    frozen: str = ""
    seed: str = ""
    head: str = ""
    ft_params_M: str = ""
    classes: str = ""  # the dataset's class abbreviations in its table's order (tables follow them)
    split_by: str = ""  # the split the run's tile index has (tile | scene), set by the fine-tuning
    test_touching_train: str = ""  # "<n>/<test tiles>": test tiles touching a training tile (shown under the tables)
    pretrain_fingerprint: str = ""
    homogeneous_share: str = ""  # Fig. 9/10 key: the share of homogeneous pre-training iterations
    homogeneous_source: str = ""  # the dataset of step 2 when it is not the target's own (Fig. 9's non-homogeneous)
    trunk_fingerprint: str = ""  # lineage: the shared archive phase (rsseg.checkpoints.identity) ...
    switch_step: str = ""  # ... and the step where this pre-training left it
    method_tags: dict[str, str] = field(default_factory=dict)  # the method's own (Method.tag_keys)
    space: dict[str, str] = field(default_factory=dict)  # the sweep axes' values (space.<key>)

    def to_tags(self) -> dict[str, str]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("method_tags", "space")}
        out = {k: v for k, v in out.items() if v != ""}
        out.update(self.method_tags)
        out.update({f"space.{k}": str(v) for k, v in self.space.items()})
        return out

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> "RunTags":
        from rsseg.methods import registry

        own = {f.name for f in fields(cls)} - {"method_tags", "space"}
        method = registry().get(tags.get("method", ""))
        keys = method.tag_keys if method is not None else ()
        return cls(
            **{k: tags.get(k, "") for k in own if k != "kind"}, kind=tags.get("kind", ""),
            method_tags={k: tags[k] for k in keys if k in tags},
            space={k[len("space."):]: v for k, v in tags.items() if k.startswith("space.")},
        )

    def row(self) -> dict[str, str]:
        """A flat row for the tables (the method's tags as columns of their own)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("method_tags", "space")}
        return out | self.method_tags

    @staticmethod
    def columns() -> list[str]:
        """Every column `row` can have: the schema's fields and every installed method's tags."""
        from rsseg.methods import registry

        own = [f.name for f in fields(RunTags) if f.name not in ("method_tags", "space")]
        extra = sorted({k for m in registry().values() for k in m.tag_keys} - set(own))
        return own + extra
