"""The run spec, assembled from the installed methods: `RunSpecBase` (config, plugin-free) plus
one block per method spec (``ddpm:``, ``mae:``, ``convnext:`` ...), validated in one place.

This module sits above both the config edge and the method registry, so imports run downward:
``config`` knows no plugin, methods import only the config specs they extend. Loading a YAML file
into a validated spec (`load_run`, `load_sweep`) happens here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import create_model, field_validator, model_validator

from rsseg.config.loader import Document, load_document, validate
from rsseg.config.profiles import dump_yaml, is_sweep_document, run_document, sweep_document
from rsseg.config.specs import RunSpecBase, SweepSpec
from rsseg.data.datasets import unknown_dataset
from rsseg.heads import head_names
from rsseg.methods import Method, registry


class _Checked(RunSpecBase):
    """The method-aware checks and derived values every assembled RunSpec has."""

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        methods = registry()
        if v not in methods:
            raise ValueError(f"unknown method {v!r}; installed: {', '.join(sorted(methods))}")
        return v

    @model_validator(mode="after")
    def _method_checks(self) -> "_Checked":
        heads = head_names()
        if self.finetune.head != "auto" and self.finetune.head not in heads:
            raise ValueError(f"@finetune.head: unknown head {self.finetune.head!r}; expected auto or one of {', '.join(heads)}")
        for key, data in (("data", self.data), ("pretrain.homogeneous_data", self.pretrain.homogeneous_data)):
            if data is not None and (problem := unknown_dataset(data.dataset)):
                raise ValueError(f"@{key}.dataset: {problem}")
        problems = self.plugin.check(self)
        if problems:
            key, message = problems[0]
            # "@key: message" lets the loader name the dotted key in its one-line error.
            raise ValueError(f"@{key}: {message}")
        return self

    @property
    def plugin(self) -> Method:
        """The registered method this run uses."""
        return registry()[self.method]

    @property
    def method_block(self) -> Any:
        """This run's method options (``run.ddpm`` for ddpm), or None for a block-less method."""
        return getattr(self, self.plugin.block) if self.plugin.block else None

    @property
    def needs_pretraining(self) -> bool:
        return self.plugin.needs_pretraining(self)

    @property
    def head_name(self) -> str:
        """The head this run fine-tunes: ``finetune.head``, or for ``auto`` its method's default
        (one for frozen features, one for fine-tuning). The one place ``auto`` is resolved."""
        ft = self.finetune
        return ft.head if ft.head != "auto" else self.plugin.default_head(ft.frozen)

    @functools.cached_property
    def pretrain_fingerprint(self) -> str:
        """The identity of this run's pre-training (computed once per spec)."""
        from rsseg.checkpoints.identity import fingerprint

        return fingerprint(self)

    def active_config(self) -> dict[str, Any]:
        """The config that shapes this run, as MLflow params show it: the run's own method block
        only (not every installed method's defaults), the data block of its dataset only, the
        pre-training block only when the method pre-trains, and the one head that is used."""
        full = self.model_dump(mode="json")
        out = {k: full[k] for k in ("name", "seed", "method", "data", "finetune", "runtime")}
        data = out["data"] = dict(out["data"])
        for sub in ("synthetic", "gid"):
            if data["dataset"] != sub:
                data.pop(sub, None)
        ft = out["finetune"] = dict(out["finetune"])
        for name in head_names():  # the option blocks of the heads not used (built-in heads have one)
            if name != self.head_name and isinstance(ft.get(name), dict):
                ft.pop(name, None)
        if self.needs_pretraining:  # what the weights are; how the pre-training ran is on its own run
            out["pretrain"] = {k: v for k, v in full["pretrain"].items() if k != "runtime"}
        if self.plugin.block:
            out[self.plugin.block] = full[self.plugin.block]
        return out


@functools.lru_cache(maxsize=1)
def run_spec_model() -> type[RunSpecBase]:
    """RunSpec with one block per installed method's spec."""
    blocks: dict[str, Any] = {}
    for method in registry().values():
        if method.block and method.block not in blocks:
            blocks[method.block] = (method.spec, method.spec())
    return create_model("RunSpec", __base__=_Checked, **blocks)


def __getattr__(name: str) -> Any:
    """``rsseg.runspec.RunSpec``: the assembled class, built on first use. Being found under its
    own module and name, a spec pickles by reference (a resolved run sent to a Ray worker or a
    Tune trial carries no copy of the class, and unpickles as an instance of the worker's own)."""
    if name == "RunSpec":
        return run_spec_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_run(data: dict[str, Any]) -> RunSpecBase:
    """A run spec from its JSON form (a plan's trial, a checkpoint's spec)."""
    return run_spec_model().model_validate(data)


@dataclass(frozen=True)
class LoadedRun:
    spec: RunSpecBase
    document: Document
    profile: str | None


@dataclass(frozen=True)
class LoadedSweep:
    spec: SweepSpec
    base: RunSpecBase
    document: Document
    profile: str | None
    path: Path


def load_run(path: str | os.PathLike, profile: str | None = None, overrides: list[str] | None = None) -> LoadedRun:
    doc = run_document(path, profile, overrides)
    return LoadedRun(spec=validate(run_spec_model(), doc), document=doc, profile=profile)


def load_sweep(path: str | os.PathLike, profile: str | None = None, overrides: list[str] | None = None) -> LoadedSweep:
    doc = sweep_document(path, profile, overrides)
    spec = validate(SweepSpec, doc)
    base = validate(run_spec_model(), doc, data=spec.base, prefix=("base",))
    return LoadedSweep(spec=spec, base=base, document=doc, profile=profile, path=Path(path).resolve())


def resolved_run_dict(spec: RunSpecBase) -> dict[str, Any]:
    return spec.model_dump(mode="json", by_alias=True)


def show(path: str | os.PathLike, profile: str | None = None, overrides: list[str] | None = None) -> str:
    """The fully resolved config (every default filled in) as YAML."""
    if is_sweep_document(load_document(path).data):
        loaded = load_sweep(path, profile, overrides)
        out = loaded.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        out["base"] = resolved_run_dict(loaded.base)
        return dump_yaml(out)
    return dump_yaml(resolved_run_dict(load_run(path, profile, overrides).spec))
