"""YAML documents -> validated, frozen specs.

The edge of the platform: everything below it receives typed specs. Order of layers:

1. the file (``${ENV}`` and ``${ENV:-default}`` interpolated in string values),
2. a profile (``sweeps/profiles/<name>.yaml``) merged over it,
3. ``--set a.b=c`` overrides (the value parsed as YAML, then type-checked like the file).

Dicts merge recursively, lists and scalars are replaced; a profile value tagged ``!replace``
replaces a whole block instead of merging into it (e.g. swapping the dataset). Every layer
remembers which source set each key, so an error names the file (or ``--set``) that caused it,
the dotted key and what was expected; an unknown key also gets the closest valid one.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rsseg.errors import ConfigError

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Replace(dict):
    """A mapping that replaces, rather than merges into, the block it lands on."""


def _replace_constructor(loader: yaml.SafeLoader, node: yaml.Node) -> Replace:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(None, None, "!replace expects a mapping", node.start_mark)
    return Replace(loader.construct_mapping(node, deep=True))


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last, silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first at line {seen[key].line + 1}); YAML would keep the "
                                    "last one silently", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.add_constructor("!replace", _replace_constructor)


@dataclass
class Document:
    """A raw config document plus where each dotted key came from."""

    data: dict[str, Any]
    origin: str  # the main file (for messages when no finer source is known)
    sources: dict[str, str] = field(default_factory=dict)
    profile_changes: list[str] = field(default_factory=list)  # "key: file's value -> profile's value (profile)"

    def source_of(self, dotted: str) -> str:
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in self.sources:
                return self.sources[key]
        return self.origin


_TOKEN_RE = re.compile(r"__rsseg_env_(\d+)__")


def _protect(text: str) -> tuple[str, list[tuple[str, str | None]]]:
    """Swap each ``${...}`` for a plain token, so that YAML flow mappings such as
    ``{root: ${DATA}/x}`` parse; the tokens are resolved after parsing, key path known."""
    found: list[tuple[str, str | None]] = []

    def token(m: re.Match) -> str:
        found.append((m.group(1), m.group(2)))
        return f"__rsseg_env_{len(found) - 1}__"

    return _ENV_RE.sub(token, text), found


def _interpolate(value: Any, path: str, file: str, refs: list[tuple[str, str | None]] | None = None) -> Any:
    def rec(v: Any, p: str) -> Any:
        if isinstance(v, Replace):
            return Replace({k: rec(x, f"{p}.{k}" if p else str(k)) for k, x in v.items()})
        if isinstance(v, dict):
            return {k: rec(x, f"{p}.{k}" if p else str(k)) for k, x in v.items()}
        if isinstance(v, list):
            return [rec(x, f"{p}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, str):
            def lookup(name: str, default: str | None) -> str:
                if name in os.environ:
                    return os.environ[name]
                if default is not None:
                    return default
                raise ConfigError(
                    f"{file}: {p}: environment variable ${{{name}}} is not set "
                    f"(set it, or write ${{{name}:-default}})"
                )

            if refs is not None:
                v = _TOKEN_RE.sub(lambda m: lookup(*refs[int(m.group(1))]), v)
            return _ENV_RE.sub(lambda m: lookup(m.group(1), m.group(2)), v)
        return v

    return rec(value, path)


_WARNED_EMPTY: set[str] = set()  # once per file and process (a file is read at several layers)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read one YAML mapping with env interpolation; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); save the file as UTF-8") from None
    try:
        text, refs = _protect(text)
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if raw is None:
        import logging

        # an empty file is valid, but every key then takes its default: the paper-scale run
        if str(path.resolve()) not in _WARNED_EMPTY:
            _WARNED_EMPTY.add(str(path.resolve()))
            logging.getLogger("rsseg.config").warning(
                "warning: %s is empty: every setting takes its default (paper scale: 200 000 pre-training iterations); "
                "did you mean another file or --profile small/smoke?", path)
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return _interpolate(raw, "", str(path), refs)


def _record_sources(data: Any, prefix: str, source: str, sources: dict[str, str]) -> None:
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            sources[key] = source
            _record_sources(v, key, source, sources)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base`` (dicts merge, the rest replaces)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Replace):
            out[k] = dict(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = _plain(v)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def load_document(path: str | os.PathLike) -> Document:
    data = read_yaml(path)
    doc = Document(data=_plain(data), origin=str(path))
    _record_sources(doc.data, "", str(path), doc.sources)
    return doc


def apply_layer(doc: Document, layer: dict[str, Any], source: str, at: str = "") -> None:
    """Merge ``layer`` into ``doc`` at the dotted prefix ``at`` (e.g. a sweep's ``base``)."""
    if at:
        target = doc.data
        for part in at.split("."):
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{doc.source_of(at)}: {at}: expected a mapping to apply {source} to")
        merged = merge(target, layer)
        parent = doc.data
        parts = at.split(".")
        for part in parts[:-1]:
            parent = parent[part]
        parent[parts[-1]] = merged
    else:
        doc.data = merge(doc.data, layer)
    _record_sources(layer, at, source, doc.sources)


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` -> ("a.b", parsed c). The value is YAML, so 3 is an int and [1, 2] a list."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set finetune.iterations=100")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {text}: invalid key {key!r}")
    try:
        parsed = yaml.load(value, Loader=_Loader) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, _interpolate(parsed, key, f"--set {key}")


def set_path(data: dict[str, Any], dotted: str, value: Any, *, merge_dicts: bool = False) -> None:
    """Set ``a.b.c`` in nested dicts, creating missing levels. With ``merge_dicts`` a mapping
    value merges into a mapping already there (``--set data={tile_size: 32}``) unless it is
    tagged ``!replace``. Raises ValueError naming the level that is not a mapping."""
    parts = dotted.split(".")
    target = data
    for part in parts[:-1]:
        nxt = target.get(part)
        if nxt is None:
            nxt = target[part] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"{part!r} is not a mapping")
        target = nxt
    last = parts[-1]
    if merge_dicts and isinstance(value, dict) and not isinstance(value, Replace) and isinstance(target.get(last), dict):
        target[last] = merge(target[last], value)
    else:
        target[last] = _plain(copy.deepcopy(value))


def apply_overrides(doc: Document, overrides: list[str], at: str = "") -> None:
    for text in overrides:
        key, value = parse_override(text)
        full = f"{at}.{key}" if at else key
        try:
            set_path(doc.data, full, value, merge_dicts=True)
        except ValueError as exc:
            raise ConfigError(f"--set {text}: {exc}, cannot set {key}") from None
        doc.sources[full] = f"--set {key}"
        _record_sources(value, full, f"--set {key}", doc.sources)


# ----------------------------------------------------------------------------------------------
# Validation errors -> one line naming the file, the dotted key and what was expected.


def _unwrap(tp: Any) -> Any:
    """Strip Optional/Annotated/Union-with-None to the interesting type."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
        for a in args:  # prefer a model type for key suggestions
            if isinstance(a, type) and issubclass(a, BaseModel):
                return a
        return args[0] if args else tp
    return tp


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the keys at ``loc`` (None if not a model)."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fld = tp.model_fields.get(part) if isinstance(part, str) else None
            if fld is None:
                return None
            tp = fld.annotation
            continue
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (dict, typing.Dict) and len(args) == 2:
            tp = args[1]
        elif origin in (list, tuple, typing.List, typing.Sequence) and args:
            tp = args[0]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-member and validator markers from an error location."""
    out = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue
        out.append(part)
    return tuple(out)


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _expected(err: dict) -> str:
    typ, msg = err["type"], err["msg"]
    given = err.get("input")
    shown = repr(given) if not isinstance(given, (dict, list)) else type(given).__name__
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if typ == "missing":
        return "required key is missing"
    if typ in ("literal_error", "enum"):
        return f"{msg.replace('Input should be', 'expected')}, got {shown}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{msg[0].lower() + msg[1:]}" + ("" if typ.startswith("value_error") else f", got {shown}")


def format_validation_error(
    exc: ValidationError, model: type[BaseModel], doc: Document, prefix: tuple = ()
) -> ConfigError:
    """The first error of ``exc`` as one line (and a count of the rest)."""
    errors = exc.errors()
    err = errors[0]
    loc = prefix + _clean_loc(err["loc"])
    keyed = re.match(r"^Value error, @([\w.\[\]]+): (.*)$", err["msg"])
    if keyed:  # a cross-field check that names its own key
        loc = loc + tuple(keyed.group(1).split("."))
        err = dict(err, msg=keyed.group(2), type="value_error")
    dotted = _dotted(loc)
    where = doc.source_of(dotted.split("[")[0])
    if err["type"] == "extra_forbidden":
        owner = _model_at(model, _clean_loc(err["loc"])[:-1])
        valid = sorted(owner.model_fields) if owner else []
        bad = str(loc[-1])
        close = difflib.get_close_matches(bad, valid, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
        message = f"{where}: {dotted}: unknown key{hint}"
    else:
        message = f"{where}: {dotted}: {_expected(err)}"
    more = len(errors) - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return ConfigError(message)


def validate(model: type[BaseModel], doc: Document, data: Any = None, prefix: tuple = ()) -> Any:
    try:
        return model.model_validate(doc.data if data is None else data)
    except ValidationError as exc:
        raise format_validation_error(exc, model, doc, prefix) from None
