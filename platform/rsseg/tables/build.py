"""Build the tables and figures: select a table's runs, aggregate over seeds, lay out beside the
paper's numbers, render Markdown / LaTeX / CSV (and PNG for the figures), write atomically.

Every output is rendered in memory first and each file is replaced atomically, so an error never
leaves a half-written table, nor a table looking regenerated when it was not.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from rsseg.tables import published
from rsseg.tables.layouts import FT, LAYOUTS, RATIO_S, Layout

DASH = "—"


@dataclass
class Cell:
    mean: float | None = None
    std: float | None = None
    n: int = 0


@dataclass
class Built:
    """One table or figure: its grid (row keys x column keys) of our cells and the paper's values."""

    layout: Layout
    rows: list[tuple[str, str]]
    columns: list[tuple[str, str]]
    ours: dict[tuple[str, str], Cell]
    paper: dict[tuple[str, str], float]
    footer: list[str]
    n_runs: int
    group: dict[str, str] = field(default_factory=dict)
    synthetic: bool = False  # our numbers come from the built-in synthetic data
    experiments: tuple[str, ...] = ()  # the MLflow experiments its runs come from

    def cell(self, row: str, col: str) -> Cell:
        return self.ours.get((row, col), Cell())


def select_group(frame, layout: Layout, profile: str | None, dataset: str | None):
    """The runs of one (profile, dataset) group: the one asked for, else the latest run's.
    Returns (runs, group, other_groups: list of (group dict, n runs))."""
    import polars as pl

    if profile is not None:
        frame = frame.filter(pl.col("profile") == profile)
    if dataset is not None and "dataset" in layout.split:
        frame = frame.filter(pl.col("dataset") == dataset)
    if frame.height == 0:
        return frame, {}, []
    latest = frame.sort("end_time").row(-1, named=True)
    group = {k: latest[k] for k in layout.split}
    mask = pl.lit(True)
    for k, v in group.items():
        mask = mask & (pl.col(k) == v)
    others = (frame.filter(~mask).group_by(list(layout.split)).len().sort(list(layout.split)).to_dicts())
    return frame.filter(mask), group, [({k: o[k] for k in layout.split}, o["len"]) for o in others]


def aggregate(runs, observe) -> dict[tuple[str, str], Cell]:
    """Mean, sample standard deviation (ddof 1; none for a single run) and n per cell."""
    import polars as pl

    obs, seen = [], set()
    for r in runs.iter_rows(named=True):
        for o in observe(r):
            if len(o) == 4:  # keyed: the same observation made by several runs counts once
                if (o[0], o[1], o[3]) in seen:
                    continue
                seen.add((o[0], o[1], o[3]))
            obs.append(o[:3])
    if not obs:
        return {}
    frame = pl.DataFrame(obs, schema={"row": pl.Utf8, "column": pl.Utf8, "value": pl.Float64}, orient="row")
    agg = frame.group_by(["row", "column"]).agg(pl.col("value").mean().alias("mean"), pl.col("value").std(ddof=1).alias("std"),
                                                pl.len().alias("n"))
    return {(r["row"], r["column"]): Cell(r["mean"], r["std"], r["n"]) for r in agg.iter_rows(named=True)}


def _ordered(base: list[tuple[str, str]], found: set[str], label) -> list[tuple[str, str]]:
    known = {k for k, _ in base}
    extra = sorted(found - known)
    return list(base) + [(k, label(k)) for k in extra]


def build_one(layout: Layout, frame, skipped: dict, *, profile: str | None = None, dataset: str | None = None,
              imagenet: Cell | None = None) -> Built:
    import polars as pl

    table_runs = frame.filter(pl.col("table") == layout.id) if frame.height else frame
    runs, group, others = select_group(table_runs, layout, profile, dataset)
    ours = aggregate(runs, layout.observe) if runs.height else {}
    if imagenet is not None and imagenet.n:
        ours[("imagenet", "mIoU")] = imagenet
    shown = group.get("dataset") or (runs["dataset"][0] if runs.height else None)
    # the paper's numbers only beside runs of the paper's dataset (or its synthetic stand-in)
    paper = published.values(layout.id) if layout.shows_paper(shown) else {}
    row_keys = {r for r, _ in ours} | {r for r, _ in paper}
    col_keys = {c for _, c in ours} | {c for _, c in paper}
    if layout.id == "fig10":
        rows = _ordered([], row_keys, str)
        columns = [(c, f"{float(c) * 100:g} %") for c in sorted(col_keys, key=float)]
    else:
        rows = _ordered(layout.rows, row_keys, layout.row_label)
        base_columns = list(layout.columns)
        if layout.class_columns and not layout.shows_paper(shown):
            # another dataset: its own classes, in its class table's order, not the paper's columns
            order = [c for c in (runs["classes"][0].split(",") if runs.height and runs["classes"][0] else [])]
            base_columns = [(c, c) for c in order] + [c for c in layout.columns if c[0] in ("mIoU", FT)]
        columns = _ordered(base_columns, col_keys, str) if layout.extra_columns else base_columns
        if layout.extra_columns:  # keep mIoU and Ft Params last, after any class only we have
            tail = [c for c in columns if c[0] in ("mIoU", FT)]
            columns = [c for c in columns if c[0] not in ("mIoU", FT)] + tail
    if layout.class_columns and not layout.shows_paper(shown):
        rows = [r for r in rows if r[0] not in layout.paper_only]
    synthetic = group.get("dataset") == "synthetic" or (runs.height and "synthetic" in set(runs["dataset"].to_list()))
    experiments = tuple(sorted(set(runs["experiment"].to_list()))) if runs.height else ()
    built = Built(layout, rows, columns, ours, paper, [], runs.height, group, bool(synthetic), experiments)
    built.footer = footer(built, runs, others, skipped)
    return built


def footer(b: Built, runs, others, skipped: dict) -> list[str]:
    lay, lines = b.layout, []
    if b.synthetic:
        lines.append(f"**Synthetic data** (profile `{b.group.get('profile') or 'none'}`): these numbers come from the built-in "
                     "procedural scenes and tiny networks; they test the pipeline and the method's relative behaviour and are "
                     "NOT comparable to the paper's values beside them.")
    if runs.height:
        # short hash, keeping provenance's "+dirty": a number from an uncommitted tree must say so
        commits = sorted({c[:12] + ("+dirty" if c.endswith("+dirty") else "") for c in runs["git_commit"].to_list() if c})
        ends = runs["end_time"]
        when = lambda ms: dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")  # noqa: E731
        seeds = sorted({s for s in runs["seed"].to_list() if s != ""}, key=lambda s: int(s) if s.isdigit() else 0)
        lines.append(f"Ours: mean ± sample std over seeds; {runs.height} finished run(s) from experiment(s) "
                     f"{', '.join(sorted(set(runs['experiment'].to_list())))}; dataset {', '.join(sorted(set(runs['dataset'].to_list())))}; "
                     f"profile {b.group.get('profile') or 'none'}; seeds {', '.join(seeds) or '?'}; "
                     f"git commit(s) {', '.join(commits) or 'unknown'}; runs ended {when(ends.min())} to {when(ends.max())} UTC. "
                     "Re-runs count once (latest run per trial key).")
    if runs.height:
        lines.extend(split_lines(runs))
        lines.extend(variation_lines(runs))
    if b.paper:
        lines.append(f"Paper: {published.source(lay.id)}.")
    n_skipped = {why: n for (t, why), n in skipped.items() if t == lay.id}
    if n_skipped:
        lines.append("Not counted: " + ", ".join(f"{n} {why} run(s)" for why, n in sorted(n_skipped.items())) + ".")
    for g, n in others:
        desc = ", ".join(f"{k} {v or 'none'}" for k, v in g.items())
        lines.append(f"Not shown: {n} run(s) with {desc} (select with --profile / --dataset).")
    ours_cols = {c for _, c in b.ours}
    empty_cell = any(not b.cell(r, c).n for r, _ in b.rows if r not in lay.paper_only for c, _ in b.columns
                     if c in ours_cols or not ours_cols)
    if empty_cell or not b.rows:
        used = b.group.get("profile") or ""
        lines.append(f"{DASH} : no finished run for this cell; `platform sweep {lay.sweep}{f' --profile {used}' if used else ''}` "
                     "fills the table.")
    absent = [lab for c, lab in b.columns if ours_cols and c not in ours_cols]
    if absent and lay.style == "pairs":
        lines.append(f"{DASH} in column(s) {', '.join(absent)} of our rows: not measured by the runs shown "
                     f"(class not in dataset {b.group.get('dataset', '?')}'s class table, or not in the sweep's grid).")
    if lay.footer_of_runs is not None and runs.height:
        lines.extend(lay.footer_of_runs(list(runs.iter_rows(named=True))))
    lines.extend(lay.notes)
    lines.append(f"Generated {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M')} UTC by rsseg {_version()} from MLflow.")
    return lines


def split_lines(runs) -> list[str]:
    """What the runs' splits were: by scene, or by tile with how many test tiles touch a training
    tile (neighbouring tiles share texture: such scores are optimistic for a map of new places)."""
    out = []
    for split in sorted({s for s in runs["split_by"].to_list() if s}):
        touching = sorted({t for s, t in zip(runs["split_by"].to_list(), runs["test_touching_train"].to_list()) if s == split and t})
        if split == "scene":
            out.append("Split by scene: every image wholly in train, val or test.")
        else:
            out.append(f"Split by tile (the paper's): test tiles touching a training tile {', '.join(touching) or '?'}; "
                       "neighbouring tiles share texture, so these scores are optimistic for a map of new places.")
    return out


def variation_lines(runs) -> list[str]:
    """What the ± covers when every run reads one pre-training: the seeds vary the segmentor only,
    and every row moves together with the pre-training (another pre-training seed, or the same
    seed on another CPU's kernels)."""
    fps = sorted({f for f in runs["pretrain_fingerprint"].to_list() if f})
    seeds = {s for s in runs["seed"].to_list() if s}
    if len(fps) == 1 and len(seeds) > 1:
        return [f"What varies: the seeds vary the segmentor only; every run reads one pre-training ({fps[0][:8]}), so the ± "
                "does not cover the pre-training: another pre-training seed, or the same one on a CPU with other floating-point "
                "kernels, moves the rows together (docs/benchmarks.md, reproducibility)."]
    return []


def _version() -> str:
    from rsseg.provenance import package_version

    return package_version()


# ---------------------------------------------------------------------------------------------- cells


def fmt(c: Cell, digits: int = 1) -> str:
    if not c.n or c.mean is None:
        return DASH
    if c.n >= 2 and c.std is not None:
        return f"{c.mean:.{digits}f} ± {c.std:.{digits}f}"
    return f"{c.mean:.{digits}f}"


def fmt_value(v: float | None) -> str:
    return DASH if v is None else f"{v:.1f}" if abs(v - round(v, 1)) < 1e-9 else f"{v:g}"


def fmt_cell(c: Cell, column: str) -> str:
    """Parameter counts do not vary over seeds: the mean alone (M, one decimal, as the paper)."""
    if column == FT:
        return DASH if not c.n or c.mean is None else f"{c.mean:.1f}"
    return fmt(c)


def _n(cells: list[Cell]) -> str:
    ns = sorted({c.n for c in cells if c.n})
    return DASH if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"


def grid(b: Built) -> tuple[list[str], list[list[str]]]:
    """Header and body rows of the table as strings (shared by Markdown and LaTeX)."""
    lay = b.layout
    if lay.style == "pairs":
        # ours - paper: only beside the paper's numbers on its dataset (on synthetic data it means nothing)
        delta = lay.delta and bool(b.paper) and not b.synthetic
        header = ["", *[lab for _, lab in b.columns]] + (["Δ mIoU"] if delta else []) + ["n"]
        body = []
        for rk, label in b.rows:
            cells = [b.cell(rk, ck) for ck, _ in b.columns]
            have_paper = any((rk, ck) in b.paper for ck, _ in b.columns)
            have_ours = any(c.n for c in cells)
            if have_ours or rk not in lay.paper_only:
                row = [f"{label} (ours)" if have_paper else label] + [fmt_cell(c, ck) for c, (ck, _) in zip(cells, b.columns)]
                if delta:
                    m, p = b.cell(rk, "mIoU"), b.paper.get((rk, "mIoU"))
                    row.append(f"{m.mean - p:+.1f}" if m.n and p is not None else DASH)
                body.append(row + [_n([c for c, (ck, _) in zip(cells, b.columns) if ck != FT])])
            if have_paper:
                body.append([f"{label} (paper)"] + [fmt_value(b.paper.get((rk, ck))) for ck, _ in b.columns]
                            + ([""] if delta else []) + [""])
        return header, body
    # "beside": each of our columns followed by the paper's
    header = [""]
    for _, lab in b.columns:
        header += [lab, f"{lab} paper"]
    header.append("n")
    body = []
    for rk, label in b.rows:
        row, cells = [label], []
        for ck, _ in b.columns:
            c = b.cell(rk, ck)
            if ck != FT:
                cells.append(c)
            row += [fmt_cell(c, ck), fmt_value(b.paper.get((rk, ck)))]
        body.append(row + [_n(cells)])
    return header, body


def markdown(b: Built) -> str:
    header, body = grid(b)
    lines = [f"### {b.layout.title_for(b.group.get('dataset'))}", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    lines.append("")
    lines += [f"- {f}" for f in b.footer]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
        "±": r"$\pm$", "—": "--", "–": "--", "Δ": r"$\Delta$", "·": r"$\cdot$", "*": "", "`": ""}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in s)


def latex(b: Built) -> str:
    header, body = grid(b)
    lines = [f"% {b.layout.id}: generated by rsseg from MLflow; do not edit by hand", r"\begin{table}[ht]", r"\centering", r"\scriptsize",
             f"\\caption{{{tex_escape(b.layout.title_for(b.group.get('dataset')))}}}", f"\\label{{tab:{b.layout.id}}}",
             r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\hline",
             " & ".join(tex_escape(h) for h in header) + r" \\", r"\hline"]
    lines += [" & ".join(tex_escape(c) for c in r) + r" \\" for r in body]
    lines += [r"\hline", r"\end{tabular}", r"\par\smallskip\raggedright"]
    lines += [tex_escape(f) + r"\\" for f in b.footer]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def csv_frame(b: Built):
    """The data behind a table or figure, one row per (row, column): ours (mean, std, n) and the paper's."""
    import polars as pl

    recs = []
    for rk, rl in b.rows:
        for ck, cl in b.columns:
            c = b.cell(rk, ck)
            p = b.paper.get((rk, ck))
            recs.append({"table": b.layout.id, "row": rk, "row_label": rl, "column": ck, "column_label": cl,
                         "ours_mean": c.mean if c.n else None, "ours_std": c.std if c.n else None, "ours_n": c.n,
                         "paper": p, "delta": (c.mean - p) if c.n and p is not None else None})
    schema = {"table": pl.Utf8, "row": pl.Utf8, "row_label": pl.Utf8, "column": pl.Utf8, "column_label": pl.Utf8,
              "ours_mean": pl.Float64, "ours_std": pl.Float64, "ours_n": pl.Int64, "paper": pl.Float64, "delta": pl.Float64}
    return pl.DataFrame(recs, schema=schema)


# ---------------------------------------------------------------------------------------------- writing


def write_atomic(path: Path, data: bytes | str) -> None:
    from rsseg.atomic import atomic_write_bytes

    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def csv_text(frame) -> str:
    import io

    buf = io.StringIO()
    frame.write_csv(buf, float_precision=4, null_value="")
    return buf.getvalue()


@dataclass
class Report:
    out: Path
    files: list[Path]
    built: dict[str, Built]
    warnings: list[str]
    markdown: dict[str, str] = field(default_factory=dict)  # table id -> its Markdown


def check_filters(frame, profile: str | None, dataset: str | None) -> None:
    """--profile / --dataset that match no finished run: a one-line error listing what exists."""
    from rsseg.tables.query import TablesError

    if not frame.height:
        if profile is not None:  # nothing to compare with: the name must at least be a profile
            from rsseg.config.profiles import find_profile
            from rsseg.errors import ConfigError

            try:
                find_profile(profile)
            except ConfigError as exc:
                raise TablesError(f"--profile {profile!r}: {exc}") from None
        return
    for flag, value, column in (("--profile", profile, "profile"), ("--dataset", dataset, "dataset")):
        have = sorted({v or "none" for v in frame[column].to_list()})
        if value is not None and value not in frame[column].to_list():
            raise TablesError(f"{flag} {value!r}: no finished run with this {column} (the store has: {', '.join(have)})")


def build_all(uri: str, out: Path, *, experiments: list[str] | None = None, profile: str | None = None,
              dataset: str | None = None) -> Report:
    from rsseg.tables import figures
    from rsseg.tables.query import read_runs

    store = read_runs(uri, experiments)
    warnings = [store.warning] if store.warning else []
    check_filters(store.runs, profile, dataset)
    built: dict[str, Built] = {}
    for tid in ("table1", "table2", "table3", "table4", "table5", "fig10"):
        built[tid] = build_one(LAYOUTS[tid], store.runs, store.skipped, profile=profile, dataset=dataset)
    # Fig. 9's ImageNet bar is Table 3's IN-init ConvNeXt-B, fine-tuned at 2 % labels (the paper's comparison).
    imagenet = built["table3"].cell("convnext_imagenet/finetuned", RATIO_S)
    built["fig9"] = build_one(LAYOUTS["fig9"], store.runs, store.skipped, profile=profile, dataset=dataset, imagenet=imagenet)
    rendered: dict[str, bytes | str] = {}
    for tid, b in built.items():
        rendered[f"{tid}.csv"] = csv_text(csv_frame(b))
        rendered[f"{tid}.md"] = markdown(b)
        if b.layout.figure:
            rendered[f"{tid}.png"] = figures.render(b)
        else:
            rendered[f"{tid}.tex"] = latex(b)
    rendered["tables.md"] = "# rsseg: the paper's tables from MLflow\n\n" + "\n".join(
        str(rendered[f"{t}.md"]) + (f"\n![{t}]({t}.png)\n" if built[t].layout.figure else "") for t in built)
    files = []
    for name, data in rendered.items():
        write_atomic(out / name, data)
        files.append(out / name)
    return Report(out, files, built, warnings, {t: str(rendered[f"{t}.md"]) for t in built})
