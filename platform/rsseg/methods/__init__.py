"""Methods as plugins.

A method = a pre-training objective (or none) + an encoder that satisfies the feature contract +
default heads for the frozen and the fine-tuned setting. Methods register through the
``rsseg.methods`` entry-point group (the DDPM method registers the same way, from this package),
so a user adds one with their own package and no edit to ``platform/``::

    [project.entry-points."rsseg.methods"]
    my_method = "my_package.method:METHOD"

The registry holds only light objects: builders are import strings, loaded when first used, so
listing or validating methods never imports a network.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

from pydantic import BaseModel

ENTRY_POINT_GROUP = "rsseg.methods"


def load_object(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # The RunSpec block holding this method's options (several methods may share one block).
    block: str | None = None
    spec: type[BaseModel] | None = None
    # "module:function" (run: RunSpec, in_channels: int) -> Objective, or None when the method is
    # not pre-trained by the platform (random or ImageNet initialisation).
    objective: str | None = None
    # Fields of the method's block that change what pre-training learns (they enter the
    # pre-training fingerprint; the rest, e.g. feature selection, does not).
    pretrain_keys: tuple[str, ...] = ()
    # "module:function" (run: RunSpec, checkpoint: Path | None) -> Encoder
    encoder: str = ""
    # Default heads: (frozen, fine-tuned).
    heads: tuple[str, str] = ("mlp", "upernet")
    # "module:function" (run) -> dict: MLflow tags describing the method's setting (timesteps, ...)
    tags: str | None = None
    # "module:function" (run) -> bool: whether this run needs the platform's pre-training
    # (default: whenever the method has an objective).
    needs_pretraining_fn: str | None = None
    # "module:function" (run) -> list of (dotted key, message): checks across blocks that a
    # field validator cannot make (e.g. warm-up longer than the whole pre-training).
    checks: str | None = None
    # "module:function" (run, feature_info) -> nn.Module with its own ``feature_info``: a trainable
    # neck between encoder and head (a ViT's single-stride blocks -> a 4-scale pyramid). It is
    # trained with the head, also when the encoder is frozen (so frozen features stay cacheable).
    neck: str | None = None
    paper_row: str | None = None  # the row of the paper's Table 3 this method reproduces
    extras: dict[str, Any] = field(default_factory=dict)

    def build_objective(self, run: Any, in_channels: int) -> Any:
        if self.objective is None:
            raise ValueError(f"method {self.name!r} has no pre-training objective")
        return load_object(self.objective)(run, in_channels)

    def build_encoder(self, run: Any, checkpoint: Any) -> Any:
        return load_object(self.encoder)(run, checkpoint)

    def run_tags(self, run: Any) -> dict[str, str]:
        return {k: str(v) for k, v in load_object(self.tags)(run).items()} if self.tags else {}

    def check(self, run: Any) -> list[tuple[str, str]]:
        return list(load_object(self.checks)(run)) if self.checks else []

    def build_neck(self, run: Any, feature_info: list) -> Any:
        return load_object(self.neck)(run, feature_info) if self.neck else None

    def default_head(self, frozen: bool) -> str:
        return self.heads[0] if frozen else self.heads[1]

    @property
    def pretrained(self) -> bool:
        return self.objective is not None

    def needs_pretraining(self, run: Any) -> bool:
        if self.objective is None:
            return False
        return bool(load_object(self.needs_pretraining_fn)(run)) if self.needs_pretraining_fn else True


def _builtin() -> dict[str, Method]:
    from rsseg.methods.ddpm import METHOD

    return {METHOD.name: METHOD}


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, Method]:
    methods = _builtin()
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
    return methods


def get(name: str) -> Method:
    methods = registry()
    if name not in methods:
        from rsseg.errors import ConfigError

        raise ConfigError(f"unknown method {name!r}; installed: {', '.join(sorted(methods))}")
    return methods[name]


Builder = Callable[..., Any]
