"""Class tables: how raw label values become class indices.

A table lists the classes (name, abbreviation as in the paper's tables, display colour) and maps
raw label values to class indices or to the ignore index. Two kinds of raw labels exist:

- ``codes``: a single-band raster of integer codes (MiniFrance, synthetic, folder datasets);
- ``colours``: a 3-band colour map (GID), mapped through an exact RGB lookup.

A raw value not in the table is an error (never a silent class): see `decode_codes` and
`decode_colours`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from rsseg.errors import DataError
from rsseg.labels import IGNORE_INDEX  # noqa: F401 - re-exported: the data layer's users import it from here


@dataclass(frozen=True)
class ClassDef:
    name: str
    abbr: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class ClassTable:
    name: str
    classes: tuple[ClassDef, ...]
    kind: Literal["codes", "colours"]
    # codes: raw code -> class index or IGNORE_INDEX. colours: packed 0xRRGGBB -> index or IGNORE.
    mapping: dict[int, int] = field(default_factory=dict)
    note: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def abbrs(self) -> list[str]:
        return [c.abbr for c in self.classes]

    def lut(self) -> np.ndarray:
        """Code lookup table for integer labels: unknown codes map to -1."""
        if self.kind != "codes":
            raise TypeError("lut() is for code tables")
        size = max(256, max(self.mapping, default=0) + 1)
        table = np.full(size, -1, dtype=np.int16)
        for code, idx in self.mapping.items():
            table[code] = idx
        return table

    def palette(self) -> np.ndarray:
        return np.array([c.color for c in self.classes], dtype=np.uint8)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "classes": self.names, "abbrs": self.abbrs}


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 -> (H, W) int32 0xRRGGBB."""
    rgb = rgb.astype(np.int32)
    return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]


def decode_codes(raw: np.ndarray, table: ClassTable, source: str | Path) -> np.ndarray:
    """Raw codes (H, W) -> class indices (H, W) uint8 with IGNORE_INDEX; unknown codes raise."""
    lut = table.lut()
    if raw.dtype.kind == "f":  # a float label raster: its values must still be whole class codes
        whole = np.isfinite(raw) & (raw == np.round(raw))
        if not whole.all():
            bad, counts = np.unique(raw[~whole], return_counts=True)
            listed = ", ".join(f"{v:g} ({n} pixels)" for v, n in zip(bad[:3], counts[:3]))
            raise DataError(f"{source}: label value {listed} is not a whole class code (float label raster); "
                            "labels must hold integer codes")
    raw = raw.astype(np.int64, copy=False)
    if raw.size and (raw.min() < 0 or raw.max() >= lut.size):
        bad = int(raw.max() if raw.max() >= lut.size else raw.min())
        count = int((raw == bad).sum())
        raise DataError(
            f"{source}: label code {bad} ({count} pixels) is not in class table {table.name!r} "
            f"(known codes: {sorted(table.mapping)})"
        )
    out = lut[raw]
    if (out < 0).any():
        bad_codes, counts = np.unique(raw[out < 0], return_counts=True)
        listed = ", ".join(f"{c} ({n} pixels)" for c, n in zip(bad_codes[:5], counts[:5]))
        raise DataError(
            f"{source}: label code {listed} not in class table {table.name!r} "
            f"(known codes: {sorted(table.mapping)})"
        )
    return out.astype(np.uint8)


def decode_colours(rgb: np.ndarray, table: ClassTable, source: str | Path) -> np.ndarray:
    """A colour-map label (3, H, W) -> class indices (H, W); a colour not in the palette raises."""
    if rgb.shape[0] < 3:
        raise DataError(f"{source}: colour-map label needs 3 bands (RGB), found {rgb.shape[0]}")
    packed = pack_rgb(rgb[:3])
    keys = np.array(sorted(table.mapping), dtype=np.int64)
    values = np.array([table.mapping[k] for k in keys], dtype=np.int64)
    pos = np.searchsorted(keys, packed)
    pos = np.clip(pos, 0, len(keys) - 1)
    known = keys[pos] == packed
    if not known.all():
        bad, counts = np.unique(packed[~known], return_counts=True)
        order = np.argsort(-counts)
        listed = ", ".join(
            f"({b >> 16},{(b >> 8) & 255},{b & 255}) x {n} pixels" for b, n in zip(bad[order][:3], counts[order][:3])
        )
        more = f" and {len(bad) - 3} more colours" if len(bad) > 3 else ""
        raise DataError(f"{source}: label colour not in the {table.name} palette: {listed}{more}")
    return values[pos].astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Named tables.


def _codes_table(name: str, defs: list[tuple[str, str, tuple[int, int, int]]], mapping: dict[int, int], note: str = "") -> ClassTable:
    return ClassTable(name=name, classes=tuple(ClassDef(*d) for d in defs), kind="codes", mapping=mapping, note=note)


def _colour_table(name: str, defs: list[tuple[str, str, tuple[int, int, int]]], ignore: list[tuple[int, int, int]]) -> ClassTable:
    mapping = {(r << 16) | (g << 8) | b: i for i, (_, _, (r, g, b)) in enumerate(defs)}
    for r, g, b in ignore:
        mapping[(r << 16) | (g << 8) | b] = IGNORE_INDEX
    return ClassTable(name=name, classes=tuple(ClassDef(*d) for d in defs), kind="colours", mapping=mapping)


# MiniFrance / DFC2022 codes (DESIGN.md section 4).
_MF_CLASSES = [
    ("urban fabric", "UB", (219, 95, 87)),
    ("industrial, commercial, public, military, private and transport units", "Ind.", (219, 151, 87)),
    ("mine, dump and construction sites", "Mine", (219, 208, 87)),
    ("artificial non-agricultural vegetated areas", "AA", (173, 219, 87)),
    ("arable land (annual crops)", "AL", (117, 219, 87)),
    ("permanent crops", "PC", (123, 196, 123)),
    ("pastures", "Pas.", (88, 177, 88)),
    ("complex and mixed cultivation patterns", "CMC", (0, 128, 0)),
    ("orchards at the fringe of urban classes", "Orc.", (88, 176, 167)),
    ("forests", "For.", (153, 93, 19)),
    ("herbaceous vegetation associations", "HV", (87, 155, 219)),
    ("open spaces with little or no vegetation", "OS", (0, 98, 255)),
    ("wetlands", "WL", (35, 32, 145)),
    ("water", "Water", (0, 0, 160)),
]

MINIFRANCE14 = _codes_table(
    "minifrance14",
    _MF_CLASSES,
    {0: IGNORE_INDEX, **{code: code - 1 for code in range(1, 15)}, 15: IGNORE_INDEX},
    note="the released codes 1-14 as classes 0-13; 0 (no information) and 15 (clouds) ignored",
)

# The paper's tables show 12 columns whose mapping onto the 14 codes is not stated. Best
# inference (documented in docs/own-data.md): the 11 columns whose names match a code map 1:1;
# the unexplained "PU" column takes code 12 (open spaces, the remaining non-vegetated class);
# complex cultivation (8) merges into arable land and urban-fringe orchards (9) into permanent
# crops. Use minifrance14 for faithful per-code results.
PAPER12 = _codes_table(
    "paper12",
    [
        ("urban fabric", "UB", (219, 95, 87)),
        ("industrial, commercial, public, military", "Ind.", (219, 151, 87)),
        ("private and transport units (inferred: open spaces, code 12)", "PU", (0, 98, 255)),
        ("mine, dump and construction sites", "Mine", (219, 208, 87)),
        ("artificial non-agricultural vegetated areas", "AA", (173, 219, 87)),
        ("arable land (+ complex cultivation, code 8)", "AL", (117, 219, 87)),
        ("permanent crops (+ urban-fringe orchards, code 9)", "PC", (123, 196, 123)),
        ("pastures", "Pas.", (88, 177, 88)),
        ("forests", "For.", (153, 93, 19)),
        ("herbaceous vegetation associations", "HV", (87, 155, 219)),
        ("wetlands", "WL", (35, 32, 145)),
        ("water", "Water", (0, 0, 160)),
    ],
    {0: IGNORE_INDEX, 1: 0, 2: 1, 12: 2, 3: 3, 4: 4, 5: 5, 8: 5, 6: 6, 9: 6, 7: 7, 10: 8, 11: 9, 13: 10, 14: 11, 15: IGNORE_INDEX},
    note="inferred mapping of the paper's 12 columns (see docs/own-data.md)",
)

GID5 = _colour_table(
    "gid5",
    [
        ("built-up", "BU", (255, 0, 0)),
        ("farmland", "FL", (0, 255, 0)),
        ("forest", "For.", (0, 255, 255)),
        ("meadow", "Mea.", (255, 255, 0)),
        ("water", "Water", (0, 0, 255)),
    ],
    ignore=[(0, 0, 0)],
)

GID15 = _colour_table(
    "gid15",
    [
        ("industrial land", "IDL", (200, 0, 0)),
        ("urban residential", "UR", (250, 0, 150)),
        ("rural residential", "RR", (200, 150, 150)),
        ("traffic land", "TL", (250, 150, 150)),
        ("paddy field", "PF", (0, 200, 0)),
        ("irrigated land", "IGL", (150, 250, 0)),
        ("dry cropland", "DC", (150, 200, 150)),
        ("garden plot", "GP", (200, 0, 200)),
        ("arbor woodland", "AW", (150, 0, 250)),
        ("shrub land", "SL", (150, 150, 250)),
        ("natural grassland", "NG", (250, 200, 0)),
        ("artificial grassland", "AG", (200, 200, 0)),
        ("river", "River", (0, 0, 200)),
        ("lake", "Lake", (0, 150, 200)),
        ("pond", "Pond", (0, 200, 250)),
    ],
    ignore=[(0, 0, 0)],
)

# The built-in synthetic land cover (rsseg.data.synthetic): codes 1-7, 0 = nodata.
SYNTHETIC7 = _codes_table(
    "synthetic7",
    [
        ("urban fabric (small blocks)", "UB", (219, 95, 87)),
        ("industrial (large blocks)", "Ind.", (219, 151, 87)),
        ("arable land (striped fields)", "AL", (117, 219, 87)),
        ("permanent crops (dot rows)", "PC", (123, 196, 123)),
        ("forest (blobs)", "For.", (153, 93, 19)),
        ("pastures (speckle)", "Pas.", (88, 177, 88)),
        ("water (smooth)", "Water", (0, 0, 160)),
    ],
    {0: IGNORE_INDEX, **{code: code - 1 for code in range(1, 8)}},
)

# Archive imagery has no labels; its scene set still carries a (classless) table.
UNLABELLED = ClassTable("unlabelled", (), "codes", {})

NAMED_TABLES: dict[str, ClassTable] = {t.name: t for t in (MINIFRANCE14, PAPER12, GID5, GID15, SYNTHETIC7)}


def named_table(name: str) -> ClassTable:
    try:
        return NAMED_TABLES[name]
    except KeyError:
        raise DataError(
            f"unknown class table {name!r}; expected one of {', '.join(sorted(NAMED_TABLES))} "
            "or a path to a class-table YAML"
        ) from None


def _node_at(node, keys: tuple):
    """The YAML node at ``keys`` (mapping keys / sequence indexes) of a composed document, or the
    deepest one that exists (so that an error names the nearest line)."""
    import yaml

    for k in keys:
        if isinstance(node, yaml.MappingNode):
            found = next((v for kn, v in node.value if kn.value == k), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(k, int) and k < len(node.value):
            found = node.value[k]
        else:
            found = None
        if found is None:
            break
        node = found
    return node


class _TableDoc:
    """A class-table file, for errors that name the file, line and key."""

    def __init__(self, path: Path):
        import yaml

        self.path = path
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save the class table as UTF-8") from None
        try:
            self.root = yaml.compose(text)
            self.doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise DataError(f"{path}{where}: invalid YAML in class table: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}") from None

    def error(self, keys: tuple, message: str) -> DataError:
        node = _node_at(self.root, keys) if self.root is not None else None
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        dotted = "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else str(k)) for i, k in enumerate(keys))
        return DataError(f"{self.path}{line}: {dotted + ': ' if dotted else ''}{message}")

    def integer(self, value, keys: tuple, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(keys, f"expected an integer {what}, got {value!r}")
        return value

    def colour(self, value, keys: tuple) -> tuple[int, int, int]:
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 255 for c in value)):
            raise self.error(keys, f"expected [r, g, b] with integers 0-255, got {value!r}")
        return tuple(value)


def load_table_yaml(path: str | Path) -> ClassTable:
    """A user's class table (folder datasets): see docs/own-data.md for the format.

    ```yaml
    name: my-landcover
    ignore: [0, 255]
    classes:
      - {code: 1, name: building, abbr: Bld, color: [255, 0, 0]}
    ```
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: class table file not found")
    t = _TableDoc(path)
    doc = t.doc
    if doc is None:
        raise DataError(f"{path}: the class table is empty; expected name, ignore and classes (docs/own-data.md)")
    if not isinstance(doc, dict):
        raise t.error((), f"expected a mapping with name, kind, ignore, classes; got {type(doc).__name__} {doc!r}")
    unknown = set(doc) - {"name", "ignore", "classes", "kind"}
    if unknown:
        raise t.error((sorted(unknown)[0],), "unknown key in class table; expected name, kind, ignore, classes")
    classes = doc.get("classes")
    if not isinstance(classes, list) or not classes:
        raise t.error(("classes",), "expected a non-empty list of {code, name, abbr, color}")
    kind = doc.get("kind", "codes")
    if kind not in ("codes", "colours"):
        raise t.error(("kind",), f"expected 'codes' or 'colours', got {kind!r}")
    defs, mapping, first = [], {}, {}
    for i, entry in enumerate(classes):
        if not isinstance(entry, dict) or "name" not in entry:
            raise t.error(("classes", i), "expected a mapping with at least 'name' and 'code' (or 'color')")
        color = t.colour(entry.get("color", [128, 128, 128]), ("classes", i, "color"))
        defs.append(ClassDef(str(entry["name"]), str(entry.get("abbr", str(entry["name"])[:4])), color))
        if kind == "codes":
            if "code" not in entry:
                raise t.error(("classes", i), "code: required for a code table")
            key, keys = t.integer(entry["code"], ("classes", i, "code"), "label code"), ("classes", i, "code")
        else:
            key, keys = (color[0] << 16) | (color[1] << 8) | color[2], ("classes", i, "color")
        if key in mapping:
            raise t.error(keys, f"{'code' if kind == 'codes' else 'colour'} {entry.get('code', list(color))!r} is already "
                                f"class {defs[mapping[key]].name!r} (classes[{first[key]}]); each must be unique")
        mapping[key], first[key] = i, i
    ignore = doc.get("ignore", []) or []
    if not isinstance(ignore, list):
        raise t.error(("ignore",), f"expected a list of {'codes' if kind == 'codes' else '[r, g, b] colours'}, got {ignore!r}")
    for j, value in enumerate(ignore):
        if kind == "codes":
            code = t.integer(value, ("ignore", j), "label code")
        else:
            r, g, b = t.colour(value, ("ignore", j))
            code = (r << 16) | (g << 8) | b
        if code in mapping and mapping[code] != IGNORE_INDEX:
            raise t.error(("ignore", j), f"{value!r} is also class {defs[mapping[code]].name!r}; a value is a class or ignored")
        mapping[code] = IGNORE_INDEX
    return ClassTable(name=str(doc.get("name", path.stem)), classes=tuple(defs), kind=kind, mapping=mapping)


def resolve_table(name_or_path: str, base_dir: Path | None = None) -> ClassTable:
    if name_or_path in NAMED_TABLES:
        return NAMED_TABLES[name_or_path]
    if name_or_path.endswith((".yaml", ".yml")):
        p = Path(name_or_path)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        return load_table_yaml(p)
    return named_table(name_or_path)
