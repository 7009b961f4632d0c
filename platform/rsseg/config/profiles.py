"""YAML files + profiles + ``--set`` -> one raw `Document` (not yet validated).

A profile is a YAML file with up to two blocks::

    run:    # merged over a run spec, or over a sweep's `base`
      data: !replace {dataset: synthetic, tile_size: 64}
    sweep:  # merged over a sweep's top level (search, space); ignored for a run spec
      search: {max_concurrent: 2}

Profiles are looked up as given (a path), then beside the file (``<dir>/profiles/<name>.yaml``),
then in ``./sweeps/profiles/``.

A sweep file may adapt a profile to itself with a ``profiles:`` block of the same shape, applied
after the shared profile (e.g. the smoke run of a two-dataset sweep drops its dataset axis)::

    profiles:
      smoke:
        sweep: {space: {data: null}}   # null removes a space axis

This module knows no method plugin: `rsseg.runspec` validates the documents against the run spec
assembled from the installed methods.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from rsseg.config.specs import AXIS_KINDS
from rsseg.config.loader import Document, _plain, apply_layer, apply_overrides, load_document, parse_override, read_yaml
from rsseg.errors import ConfigError


SHIPPED = Path(__file__).resolve().parents[3] / "sweeps" / "profiles"


def find_profile(name: str, near: str | os.PathLike | None = None) -> Path:
    candidates = []
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml"):
        candidates.append(as_path)
    if near is not None:
        candidates.append(Path(near).resolve().parent / "profiles" / f"{name}.yaml")
        candidates.append(Path(near).resolve().parent / f"{name}.yaml")  # a profile extending its sibling
    candidates.append(Path.cwd() / "sweeps" / "profiles" / f"{name}.yaml")
    candidates.append(SHIPPED / f"{name}.yaml")  # the checkout's own, from any directory
    for c in candidates:
        if c.is_file():
            return c.resolve()
    import difflib

    searched = ", ".join(str(c) for c in dict.fromkeys(candidates))
    # profiles are the files of a profiles/ folder (a sweep file beside the sweep is not one)
    available = sorted({p.stem for c in candidates if c.parent.name == "profiles" for p in c.parent.glob("*.yaml")})
    close = difflib.get_close_matches(name, available, n=1)
    hint = (f"; did you mean {close[0]!r}?" if close else "") + (f" (profiles: {', '.join(available)})" if available else "")
    raise ConfigError(f"profile {name!r} not found (looked for {searched}){hint}")


def profile_layers(name: str, near: str | os.PathLike) -> list[tuple[Path, str, dict[str, Any], dict[str, Any]]]:
    """[(file, name, run layer, sweep layer)] of a profile and the profiles it ``extends``, the
    most basic first (``smoke`` extends ``small``: small's layers, then smoke's)."""
    chain: list[tuple[Path, str, dict[str, Any], dict[str, Any]]] = []
    seen: set[Path] = set()
    while name:
        path = find_profile(name, near)
        if path in seen:
            raise ConfigError(f"{path}: extends: profiles extend each other in a loop")
        seen.add(path)
        data = read_yaml(path)
        unknown = set(data) - {"run", "sweep", "description", "extends"}
        if unknown:
            raise ConfigError(f"{path}: {sorted(unknown)[0]}: unknown key; a profile has 'run', 'sweep', 'description' and 'extends'")
        for key in ("run", "sweep"):
            if not isinstance(data.get(key, {}), dict):
                raise ConfigError(f"{path}: {key}: expected a mapping")
        chain.append((path, path.stem, data.get("run", {}) or {}, data.get("sweep", {}) or {}))
        name, near = data.get("extends"), path
    return chain[::-1]


def profile_description(name: str, near: str | os.PathLike | None = None) -> str:
    return str(read_yaml(find_profile(name, near)).get("description", ""))


_GONE = object()


def changed_values(before: Any, after: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, the file's value, the value after the profile) for every value the file wrote
    that a profile changed or removed; a mapping replaced as a whole (``!replace`` with other keys)
    is one entry."""
    if not isinstance(before, dict):
        return [] if before == after else [(prefix, before, after)]
    if not isinstance(after, dict) or not set(before) <= set(after):
        return [(prefix, before, after)]
    out = []
    for k, v in before.items():
        out += changed_values(v, after.get(k, _GONE), f"{prefix}.{k}" if prefix else str(k))
    return out


def _flow(v: Any) -> str:
    if v is _GONE:
        return "(removed)"
    return yaml.safe_dump(_plain(v), default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _record_profile_changes(doc: Document, before: dict[str, Any], profile: str) -> None:
    doc.profile_changes = [f"profile {profile} changes {key}: {_flow(old)} -> {_flow(new)}"
                           for key, old, new in changed_values(before, doc.data)]


def is_sweep_document(data: dict[str, Any]) -> bool:
    return "base" in data or "space" in data or "search" in data


def run_document(path: str | os.PathLike, profile: str | None = None, overrides: list[str] | None = None) -> Document:
    """A run spec file with its profile's ``run`` block and the overrides merged in."""
    doc = load_document(path)
    if is_sweep_document(doc.data):
        raise ConfigError(f"{path}: this is a sweep file (it has base/space/search); run it with `platform sweep`")
    before = copy.deepcopy(doc.data)
    for ppath, _, run_layer, _ in profile_layers(profile, path) if profile else []:
        apply_layer(doc, run_layer, str(ppath))
    if profile:
        _record_profile_changes(doc, before, profile)
    apply_overrides(doc, overrides or [])
    return doc


def sweep_document(path: str | os.PathLike, profile: str | None = None, overrides: list[str] | None = None) -> Document:
    """A sweep file with the profile (shared, then the file's own ``profiles:`` overlay) and the
    overrides merged in; ``space`` axes set to null are removed."""
    doc = load_document(path)
    if not is_sweep_document(doc.data):
        raise ConfigError(f"{path}: not a sweep file (expected name, base, space, search); run a single spec with `platform finetune`")
    local = doc.data.pop("profiles", None) or {}
    if not isinstance(local, dict):
        raise ConfigError(f"{path}: profiles: expected a mapping of profile name -> {{run, sweep}}")
    before = copy.deepcopy(doc.data)
    for ppath, name, run_layer, sweep_layer in profile_layers(profile, path) if profile else []:
        apply_layer(doc, sweep_layer, str(ppath))
        apply_layer(doc, run_layer, str(ppath), at="base")
        overlay = local.get(name, {}) or {}  # the file's own adaptation to this profile (and to those it extends)
        unknown = set(overlay) - {"run", "sweep"}
        if unknown:
            raise ConfigError(f"{path}: profiles.{name}.{sorted(unknown)[0]}: unknown key; expected run or sweep")
        apply_layer(doc, overlay.get("sweep", {}) or {}, f"{path} (profiles.{name})")
        apply_layer(doc, overlay.get("run", {}) or {}, f"{path} (profiles.{name})", at="base")
    if profile:
        _record_profile_changes(doc, before, profile)
    plain, axes = place_sweep_overrides(overrides or [])
    apply_overrides(doc, plain)
    for text in axes:  # space.<dotted run key>=...: the axis key keeps its dots
        key, value = parse_override(text)
        axis, _, kind = key[len("space."):].rpartition(".")
        if axis and kind in AXIS_KINDS:  # space.seed.grid=[0] is the axis seed: {grid: [0]} (no run key ends in an axis kind)
            value = {kind: value}
        else:
            axis = key[len("space."):]
        doc.data.setdefault("space", {})[axis] = value
        doc.sources[f"space.{axis}"] = f"--set {key}"
    space = doc.data.get("space")
    if isinstance(space, dict):  # an overlay or --set may remove an axis with null
        doc.data["space"] = {k: v for k, v in space.items() if v is not None}
    return doc


SWEEP_KEYS = ("name", "table", "description", "base", "space", "search", "profiles")


def place_sweep_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--set`` of a sweep: keys of the sweep file as they are, run keys (``finetune.iterations``)
    under ``base.``, and ``space.<axis>`` (whose axis name is a dotted run key) apart."""
    plain, axes = [], []
    for text in overrides:
        key = text.partition("=")[0].strip()
        head = key.split(".")[0]
        if head == "space" and "." in key:
            axes.append(text)
        elif head in SWEEP_KEYS or "=" not in text:
            plain.append(text)
        else:
            plain.append(f"base.{text}")
    return plain, axes


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
