"""Load run specs and sweep specs from YAML with profiles and ``--set`` overrides.

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
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rsseg.config.loader import Document, apply_layer, apply_overrides, load_document, read_yaml, validate
from rsseg.config.specs import RunSpecBase, SweepSpec, run_spec_model
from rsseg.errors import ConfigError


def find_profile(name: str, near: str | os.PathLike | None = None) -> Path:
    candidates = []
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml"):
        candidates.append(as_path)
    if near is not None:
        candidates.append(Path(near).resolve().parent / "profiles" / f"{name}.yaml")
    candidates.append(Path.cwd() / "sweeps" / "profiles" / f"{name}.yaml")
    for c in candidates:
        if c.is_file():
            return c.resolve()
    searched = ", ".join(str(c) for c in dict.fromkeys(candidates))
    available = sorted({p.stem for c in candidates for p in c.parent.glob("*.yaml")} if candidates else [])
    hint = f"; available: {', '.join(available)}" if available else ""
    raise ConfigError(f"profile {name!r} not found (looked for {searched}){hint}")


def _profile_layers(name: str, near: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    path = find_profile(name, near)
    data = read_yaml(path)
    unknown = set(data) - {"run", "sweep", "description"}
    if unknown:
        raise ConfigError(f"{path}: {sorted(unknown)[0]}: unknown key; a profile has 'run' and 'sweep' blocks")
    for key in ("run", "sweep"):
        if not isinstance(data.get(key, {}), dict):
            raise ConfigError(f"{path}: {key}: expected a mapping")
    return path, data.get("run", {}) or {}, data.get("sweep", {}) or {}


def is_sweep_document(data: dict[str, Any]) -> bool:
    return "base" in data or "space" in data or "search" in data


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
    doc = load_document(path)
    if is_sweep_document(doc.data):
        raise ConfigError(f"{path}: this is a sweep file (it has base/space/search); run it with `platform sweep`")
    if profile:
        ppath, run_layer, _ = _profile_layers(profile, path)
        apply_layer(doc, run_layer, str(ppath))
    apply_overrides(doc, overrides or [])
    spec = validate(run_spec_model(), doc)
    return LoadedRun(spec=spec, document=doc, profile=profile)


def load_sweep(path: str | os.PathLike, profile: str | None = None, overrides: list[str] | None = None) -> LoadedSweep:
    doc = load_document(path)
    if not is_sweep_document(doc.data):
        raise ConfigError(f"{path}: not a sweep file (expected name, base, space, search); run a single spec with `platform finetune`")
    local = doc.data.pop("profiles", None) or {}
    if not isinstance(local, dict):
        raise ConfigError(f"{path}: profiles: expected a mapping of profile name -> {{run, sweep}}")
    if profile:
        ppath, run_layer, sweep_layer = _profile_layers(profile, path)
        apply_layer(doc, sweep_layer, str(ppath))
        apply_layer(doc, run_layer, str(ppath), at="base")
        overlay = local.get(Path(profile).stem, {}) or {}
        unknown = set(overlay) - {"run", "sweep"}
        if unknown:
            raise ConfigError(f"{path}: profiles.{Path(profile).stem}.{sorted(unknown)[0]}: unknown key; expected run or sweep")
        apply_layer(doc, overlay.get("sweep", {}) or {}, f"{path} (profiles.{Path(profile).stem})")
        apply_layer(doc, overlay.get("run", {}) or {}, f"{path} (profiles.{Path(profile).stem})", at="base")
    apply_overrides(doc, overrides or [])
    space = doc.data.get("space")
    if isinstance(space, dict):  # an overlay or --set may remove an axis with null
        doc.data["space"] = {k: v for k, v in space.items() if v is not None}
    spec = validate(SweepSpec, doc)
    base = validate(run_spec_model(), doc, data=spec.base, prefix=("base",))
    return LoadedSweep(spec=spec, base=base, document=doc, profile=profile, path=Path(path).resolve())


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def resolved_run_dict(spec: RunSpecBase) -> dict[str, Any]:
    return spec.model_dump(mode="json", by_alias=True)


def show(path: str | os.PathLike, profile: str | None = None, overrides: list[str] | None = None) -> str:
    """The fully resolved config (every default filled in) as YAML."""
    raw = load_document(path)
    if is_sweep_document(raw.data):
        loaded = load_sweep(path, profile, overrides)
        out = loaded.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        out["base"] = resolved_run_dict(loaded.base)
        return dump_yaml(out)
    return dump_yaml(resolved_run_dict(load_run(path, profile, overrides).spec))
