"""Datasets registered by name, as heads and methods are: ``data.dataset: NAME`` in YAML.

A dataset is a `Dataset`: how its scenes are found under ``data.root`` (the labelled ones with
their label rasters, the unlabelled ones for step-2 pre-training) and its default class table.
Built in: ``synthetic`` (generated on first use), ``minifrance``, ``gid`` and ``folder`` (images/ +
masks/ + classes.yaml, docs/own-data.md). A user's own layout comes from their package through the
``rsseg.datasets`` entry-point group (listed by name without importing it)::

    [project.entry-points."rsseg.datasets"]
    my_archive = "my_package.data:DATASET"

`register_dataset` adds one in-process (tests, notebooks). This module imports nothing heavy: a
run spec's validation asks it for the names.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

ENTRY_POINT_GROUP = "rsseg.datasets"


@dataclass(frozen=True)
class Dataset:
    # (spec: DataSpec, table: ClassTable, workdir: Workdir) -> SceneSet, the scenes under spec.root
    scenes: Callable[..., Any]
    # the default class table: a named table or a YAML path, or (spec) -> one; None: the run must
    # name one (data.class_table)
    table: str | Callable[..., str] | None = None
    needs_root: bool = True  # refused without data.root (the synthetic dataset generates its own)


# name -> "module:attribute" (loaded on first use) or the Dataset itself
DATASETS: dict[str, str | Dataset] = {
    "synthetic": "rsseg.data.registry:SYNTHETIC",
    "minifrance": "rsseg.data.registry:MINIFRANCE",
    "gid": "rsseg.data.registry:GID",
    "folder": "rsseg.data.registry:FOLDER",
}


def register_dataset(name: str, dataset: str | Dataset) -> None:
    DATASETS[name] = dataset


@functools.lru_cache(maxsize=1)
def _installed() -> dict[str, str]:
    """The datasets installed packages declare: name -> "module:attribute" (nothing imported), read
    once per process."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def dataset_names() -> list[str]:
    """Every dataset a run may name: built in, installed, registered in this process."""
    return sorted(set(DATASETS) | set(_installed()))


def unknown_dataset(name: str) -> str | None:
    """Why ``name`` is not a dataset ("unknown dataset ...; expected one of ..."), or None."""
    return None if name in DATASETS or name in _installed() else f"unknown dataset {name!r}; expected one of {', '.join(dataset_names())}"


def get(name: str) -> Dataset:
    from rsseg.imports import load_object

    found = DATASETS.get(name) or _installed().get(name)
    if found is None:
        raise ValueError(unknown_dataset(name))
    dataset = load_object(found) if isinstance(found, str) else found
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset {name!r}: {found!r} is not an rsseg.data.datasets.Dataset, got {type(dataset).__name__}")
    return dataset
