"""Methods as plugins.

A method = a pre-training objective (or none) + an encoder that satisfies the feature contract +
default heads for the frozen and the fine-tuned setting. Every method, the paper's own DDPM
included, registers through the ``rsseg.methods`` entry-point group, so a user adds one with
their own package and no edit to ``platform/`` (docs/methods.md)::

    [project.entry-points."rsseg.methods"]
    my_method = "my_package.method:METHOD"

Its hooks are functions (timm's ``register_model``), checked when the method is made: a hook that
is not callable with the arguments the platform passes is a load error naming the method and the
hook, not a failure in the middle of a sweep. A method's modules import torch at most at their top;
diffusers and transformers are imported inside the builders that need them (`Method.imports`).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, fields
from importlib import metadata
from typing import Any, Callable

from pydantic import BaseModel

ENTRY_POINT_GROUP = "rsseg.methods"

Hook = Callable[..., Any]

# hook -> the arguments the platform calls it with
HOOK_ARGS: dict[str, tuple[str, ...]] = {
    "objective": ("run", "in_channels"), "encoder": ("run", "pretrained"), "tags": ("run",),
    "needs_pretraining_fn": ("run",), "checks": ("run",), "neck": ("run", "feature_info"),
    "unavailable": ("run",), "preflight": ("run",), "skeleton": ("run", "in_channels"),
}


def check_hook(method: str, hook: str, fn: Any, args: tuple[str, ...]) -> None:
    """``fn`` can be called as the platform calls ``hook`` (``args`` positionally), else TypeError."""
    try:
        inspect.signature(fn).bind(*args)
    except (TypeError, ValueError):
        raise TypeError(f"method {method!r}: {hook} must be a function of ({', '.join(args)}), got {fn!r}") from None


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # How the tables name the method's rows (Table 3: "MAE · Frozen", ...).
    label: str
    # (run: RunSpec, pretrained: Pretrained | None) -> Encoder
    encoder: Hook
    # The RunSpec block holding this method's options (several methods may share one block).
    block: str | None = None
    spec: type[BaseModel] | None = None
    # (run: RunSpec, in_channels: int) -> Objective, or None when the method is not pre-trained by
    # the platform (random or ImageNet initialisation).
    objective: Hook | None = None
    # Fields of the method's block that change what pre-training learns (they enter the
    # pre-training fingerprint; the rest, e.g. feature selection, does not).
    pretrain_keys: tuple[str, ...] = ()
    # Default heads: (frozen, fine-tuned).
    heads: tuple[str, str] = ("mlp", "upernet")
    # (run) -> dict: MLflow tags describing the method's setting (timesteps, ...), with their names
    # in `tag_keys` (the run-tag schema reads them back by these names).
    tags: Hook | None = None
    tag_keys: tuple[str, ...] = ()
    # (run) -> bool: whether this run needs the platform's pre-training (default: whenever the
    # method has an objective).
    needs_pretraining_fn: Hook | None = None
    # (run) -> list of (dotted key, message): checks across blocks that a field validator cannot
    # make (e.g. warm-up longer than the whole pre-training).
    checks: Hook | None = None
    # (run, feature_info) -> nn.Module with its own ``feature_info``: a trainable neck between
    # encoder and head (a ViT's single-stride blocks -> a 4-scale pyramid). It is trained with the
    # head, also when the encoder is frozen (so frozen features stay cacheable).
    neck: Hook | None = None
    # (run) -> str | None: why this run cannot be made here (e.g. no local ImageNet weights). A
    # sweep skips such cells with the reason instead of failing.
    unavailable: Hook | None = None
    # (run) -> list of (dotted key, message): checks too slow for every validation (reading a
    # weights file's keys), made once per sweep plan before anything runs.
    preflight: Hook | None = None
    # (run, in_channels) -> Encoder with untrained weights: built on the meta device to count
    # parameters at plan time (no data, no checkpoint, nothing allocated).
    skeleton: Hook | None = None
    # Released weights this method reads (`platform weights import --format F`): (format,
    # converter (path, **options) -> state in the store's final form: model, ema (None), objective).
    importers: tuple[tuple[str, Hook], ...] = ()
    # Heavy modules its builders import (diffusers, transformers): the driver imports them in the
    # background while the Ray cluster starts (`rsseg.raycluster.init`), not after it.
    imports: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            fn = getattr(self, f.name)
            if f.name in HOOK_ARGS and (fn is not None or f.name == "encoder"):
                check_hook(self.name, f.name, fn, HOOK_ARGS[f.name])
        for fmt, converter in self.importers:
            check_hook(self.name, f"importer {fmt!r}", converter, ("path",))

    def build_objective(self, run: Any, in_channels: int) -> Any:
        if self.objective is None:
            raise ValueError(f"method {self.name!r} has no pre-training objective")
        return self.objective(run, in_channels)

    def build_encoder(self, run: Any, pretrained: Any) -> Any:
        return self.encoder(run, pretrained)

    def build_skeleton(self, run: Any, in_channels: int) -> Any:
        """The encoder with untrained weights (build it under ``torch.device("meta")`` to allocate nothing)."""
        if self.skeleton is None:
            raise ValueError(f"method {self.name!r} has no skeleton builder")
        return self.skeleton(run, in_channels)

    def run_tags(self, run: Any) -> dict[str, str]:
        return {k: str(v) for k, v in self.tags(run).items()} if self.tags else {}

    def check(self, run: Any) -> list[tuple[str, str]]:
        return list(self.checks(run)) if self.checks else []

    def unavailable_reason(self, run: Any) -> str | None:
        return self.unavailable(run) if self.unavailable else None

    def preflight_problems(self, run: Any) -> list[tuple[str, str]]:
        return list(self.preflight(run)) if self.preflight else []

    def build_neck(self, run: Any, feature_info: list) -> Any:
        return self.neck(run, feature_info) if self.neck else None

    def skeletons(self, run: Any, in_channels: int, num_classes: int, head: str) -> tuple[Any, Any, Any] | None:
        """(encoder, neck or None, head) of ``run``'s networks, untrained, on the meta device (the
        resolved run's ``head``); None when the method has no skeleton builder."""
        if self.skeleton is None:
            return None
        import torch

        from rsseg.heads import build_head

        with torch.device("meta"):
            encoder = self.build_skeleton(run, in_channels)
            neck = self.build_neck(run, encoder.feature_info)
            return encoder, neck, build_head(head, (neck or encoder).feature_info, num_classes, run.finetune)

    def parameter_counts(self, run: Any, in_channels: int, num_classes: int, head: str) -> tuple[int, int] | None:
        """(encoder, head + neck) parameters of ``run``'s networks (`skeletons`)."""
        from rsseg.encoders import count_parameters

        nets = self.skeletons(run, in_channels, num_classes, head)
        if nets is None:
            return None
        encoder, neck, head_net = nets
        return count_parameters(encoder), count_parameters(head_net) + (count_parameters(neck) if neck is not None else 0)

    def default_head(self, frozen: bool) -> str:
        return self.heads[0] if frozen else self.heads[1]

    @property
    def pretrained(self) -> bool:
        return self.objective is not None

    def needs_pretraining(self, run: Any) -> bool:
        if self.objective is None:
            return False
        return bool(self.needs_pretraining_fn(run)) if self.needs_pretraining_fn else True


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, Method]:
    methods: dict[str, Method] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not take the platform down
            warnings.warn(f"method plugin {ep.name!r} ({ep.value}) failed to load: {exc}", stacklevel=2)
            continue
        if not isinstance(obj, Method):
            warnings.warn(f"method plugin {ep.name!r} ({ep.value}) is not an rsseg.methods.Method", stacklevel=2)
            continue
        methods.setdefault(obj.name, obj)
    return dict(sorted(methods.items()))


def get(name: str) -> Method:
    methods = registry()
    if name not in methods:
        from rsseg.errors import ConfigError

        raise ConfigError(f"unknown method {name!r}; installed: {', '.join(sorted(methods))}")
    return methods[name]
