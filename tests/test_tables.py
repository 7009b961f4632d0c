"""`platform tables` on a real MLflow SQLite store filled with hand-made runs of known values."""

import math
import socket

import polars as pl
import pytest
from typer.testing import CliRunner

from rsseg.cli import app
from rsseg.tables import build, figures
from rsseg.tables.build import build_all

T0 = 1_790_000_000_000  # ms; runs end in this order


def _run(c, exp, *, table, metrics, status="FINISHED", end=0, **tags):
    base = {"kind": "finetune", "table": table, "profile": "smoke", "dataset": "synthetic", "method": "ddpm",
            "label_ratio": "0.02", "frozen": "true", "seed": "0", "git_commit": "abc1234def5678", "sweep": exp}
    r = c.create_run(c.get_experiment_by_name(exp).experiment_id if c.get_experiment_by_name(exp) else c.create_experiment(exp),
                     tags={**base, **tags}, start_time=T0 + end - 1000)
    for k, v in metrics.items():
        c.log_metric(r.info.run_id, k, v)
    c.set_terminated(r.info.run_id, status=status, end_time=T0 + end)
    return r.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    d = tmp_path_factory.mktemp("tables")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    t2 = dict(table="table2", timesteps="150,100,50")
    # Table 2, t = [150, 100, 50]: seeds 0 and 1 (seed 1 re-run: the older run must not count)
    _run(c, "noise_ablation", **t2, seed="0", trial_key="k0", end=1, metrics={"test/mIoU": 0.70, "test/IoU/UB": 0.80, "test/IoU/Water": 0.60})
    _run(c, "noise_ablation", **t2, seed="1", trial_key="k1", end=2, metrics={"test/mIoU": 0.10, "test/IoU/UB": 0.10, "test/IoU/Water": 0.10})
    _run(c, "noise_ablation_again", **t2, seed="1", trial_key="k1", end=5, metrics={"test/mIoU": 0.74, "test/IoU/UB": 0.90, "test/IoU/Water": 0.58})
    # a FAILED run of the same cell, with a value that would show if it counted
    _run(c, "noise_ablation", **t2, seed="2", trial_key="k2", end=3, status="FAILED", metrics={"test/mIoU": 0.05})
    # t = [0], one seed
    _run(c, "noise_ablation", table="table2", timesteps="0", trial_key="k3", end=4, metrics={"test/mIoU": 0.66, "test/IoU/UB": 0.7})
    # a run of the same table on another profile: never mixed in
    _run(c, "noise_ablation", **t2, profile="paper", dataset="minifrance", trial_key="k4", end=0, metrics={"test/mIoU": 0.99})
    # another table: Table 3, ours frozen at 2 %
    # (from an uncommitted tree: the footer must keep provenance's +dirty)
    _run(c, "label_ratio", table="table3", trial_key="k5", end=6, git_commit="abc1234def5678+dirty",
         metrics={"test/mIoU": 0.5, "params/trainable": 16_300_000})
    # figures: pre-training strategies and homogeneous share
    for i, (share, v) in enumerate([("0", 0.40), ("0.1", 0.45), ("1", 0.43)]):
        _run(c, "pretrain_strategy", table="fig9", homogeneous_share=share, trial_key=f"f9{i}", end=10 + i, metrics={"test/mIoU": v})
    for i, (share, v) in enumerate([("0", 0.50), ("0.5", 0.60), ("0.5", 0.64), ("1", 0.55)]):
        _run(c, "homogeneous_ratio", table="fig10", homogeneous_share=share, seed=str(i), trial_key=f"f10{i}", end=20 + i,
             metrics={"test/mIoU": v})
    return uri


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    return build_all(store, tmp_path_factory.mktemp("out"))


def _cell(out, table, row, column):
    frame = pl.read_csv(out / f"{table}.csv", schema_overrides={"row": pl.Utf8, "column": pl.Utf8})
    return frame.filter((pl.col("row") == row) & (pl.col("column") == column)).row(0, named=True)


def test_table2_cells_aggregate_seeds_exclude_failed_and_rerun(report):
    cell = _cell(report.out, "table2", "150,100,50", "mIoU")
    assert cell["ours_n"] == 2
    assert cell["ours_mean"] == pytest.approx(72.0)
    assert cell["ours_std"] == pytest.approx(math.sqrt(8.0), abs=1e-4)  # sample std of 70 and 74
    assert cell["paper"] == 42.7 and cell["delta"] == pytest.approx(29.3)
    ub = _cell(report.out, "table2", "150,100,50", "UB")
    assert ub["ours_mean"] == pytest.approx(85.0) and ub["paper"] == 58.1
    one = _cell(report.out, "table2", "0", "mIoU")
    assert (one["ours_n"], one["ours_mean"], one["ours_std"]) == (1, pytest.approx(66.0), None)
    md = (report.out / "table2.md").read_text()
    assert "| t = [150, 100, 50] (ours) | 85.0 ± 7.1 | — |" in md
    assert md.count("| t = [150, 100, 50] (ours) |") == 1
    row = next(l for l in md.splitlines() if l.startswith("| t = [150, 100, 50] (ours)"))
    assert row.endswith("| 72.0 ± 2.8 | 2 |") and "Δ" not in md  # ours - paper means nothing on synthetic data
    assert "| t = [0] (ours) | 70.0 |" in md and "| t = [0] (paper) | 59.4 | 39.3 |" in md
    assert "Not counted: 1 failed run(s)." in md
    assert "Not shown: 1 run(s) with profile paper, dataset minifrance" in md
    assert "experiment(s) noise_ablation, noise_ablation_again" in md and "abc1234def56" in md
    assert "**Synthetic data** (profile `smoke`)" in md and "NOT comparable" in md
    # some rows of ours are still empty: the footer names the command with the profile these runs used
    assert "`platform sweep sweeps/noise_ablation.yaml --profile smoke` fills the table" in md
    assert report.built["table2"].n_runs == 3


def test_the_difference_to_the_paper_is_shown_for_runs_on_the_papers_dataset(store, tmp_path):
    md = (build_all(store, tmp_path, profile="paper").out / "table2.md").read_text()
    row = next(l for l in md.splitlines() if l.startswith("| t = [150, 100, 50] (ours)"))
    assert "| mIoU | Δ mIoU | n |" in md and row.endswith("| 99.0 | +56.3 | 1 |")  # MiniFrance, paper profile


def test_table3_and_params_and_latex(report):
    cell = _cell(report.out, "table3", "ddpm/frozen", "0.02")
    assert (cell["ours_mean"], cell["ours_n"], cell["paper"]) == (pytest.approx(50.0), 1, 42.7)
    ft = _cell(report.out, "table3", "ddpm/frozen", "ft_params_M")
    assert ft["ours_mean"] == pytest.approx(16.3) and ft["paper"] == 16.3
    md = (report.out / "table3.md").read_text()
    assert "| ours (DDPM) · Frozen | 50.0 | 42.7 | — | 46.3 | — | 48.1 | 16.3 | 16.3 | 1 |" in md
    assert "| MAE · Fine-tuning | — | 42.0 |" in md
    tex = (report.out / "table3.tex").read_text()
    assert r"\begin{tabular}" in tex and r"S (2 \%)" in tex and "50.0 & 42.7" in tex and r"\label{tab:table3}" in tex


def test_table_provenance_names_runs_and_paper(report):
    assert "git commit(s) abc1234def56+dirty;" in (report.out / "table3.md").read_text()
    assert "git commit(s) abc1234def56;" in (report.out / "table2.md").read_text()
    md = (report.out / "table4.md").read_text()
    # nothing of ours yet: our rows are skeletons, the SOTA rows are the paper's
    assert "| ours (MiniFrance-S) (ours) | — |" in md and "| SETR (paper) | 58.4 |" in md
    assert "platform sweep sweeps/sota_minifrance.yaml" in md
    assert "Luo et al. 2025" in md


def test_figures_written_with_their_data(report):
    for fig in ("fig9", "fig10"):
        png = (report.out / f"{fig}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(report.out / "fig9.png").shape[:2] == (504, 900)
    f9 = pl.read_csv(report.out / "fig9.csv")
    got = {r["row"]: (r["ours_mean"], r["paper"]) for r in f9.iter_rows(named=True)}
    assert got["archive_only"] == (pytest.approx(40.0), 40.0)
    assert got["two_step"] == (pytest.approx(45.0), 42.7)
    assert got["homogeneous_only"] == (pytest.approx(43.0), None)
    assert got["imagenet"] == (None, 34.3)  # no ConvNeXt run in Table 3 yet
    f10 = pl.read_csv(report.out / "fig10.csv", schema_overrides={"column": pl.Utf8})
    rows = {(r["row"], r["column"]): (r["ours_mean"], r["ours_n"]) for r in f10.iter_rows(named=True)}
    assert rows == {("synthetic", "0"): (pytest.approx(50.0), 1), ("synthetic", "0.5"): (pytest.approx(62.0), 2),
                    ("synthetic", "1"): (pytest.approx(55.0), 1)}


def test_cli_empty_store_warns_and_writes_skeletons(tmp_path):
    res = CliRunner().invoke(app, ["--workdir", str(tmp_path / "w"), "tables", "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert "warning: no MLflow store at" in res.output
    md = (tmp_path / "t" / "table2.md").read_text()
    assert "| t = [0] (ours) | — |" in md and "`platform sweep sweeps/noise_ablation.yaml` fills the table" in md
    assert not (tmp_path / "w" / "mlflow.db").exists()  # reading never creates a store


def test_cli_unreachable_server_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = CliRunner().invoke(app, ["tables", "--tracking-uri", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "t")])
    assert res.exit_code == 2
    assert res.output.strip().startswith(f"error: MLflow tracking server http://127.0.0.1:{port} is unreachable")
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_cli_unknown_experiment(store, tmp_path):
    res = CliRunner().invoke(app, ["tables", "--tracking-uri", store, "--experiment", "nosuch", "--out", str(tmp_path / "t")])
    assert res.exit_code == 2
    assert "error: --experiment 'nosuch': no such experiment" in res.output and "noise_ablation" in res.output


def test_experiment_and_profile_filters(store, tmp_path):
    r = build_all(store, tmp_path / "a", experiments=["noise_ablation"])
    cell = r.built["table2"].cell("150,100,50", "mIoU")
    # the re-run of seed 1 lives in the other experiment: here its first run (mIoU 0.10) is the latest
    assert cell.n == 2 and cell.mean == pytest.approx(40.0)
    r = build_all(store, tmp_path / "b", profile="paper")
    assert r.built["table2"].cell("150,100,50", "mIoU").mean == pytest.approx(99.0)
    assert r.built["table2"].group == {"profile": "paper", "dataset": "minifrance"}


def test_failure_while_rendering_leaves_previous_tables(store, tmp_path, monkeypatch):
    out = tmp_path / "t"
    build_all(store, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(figures, "render", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_all(store, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing half-written, no temp files


def test_cell_format():
    assert build.fmt(build.Cell(72.0, 2.8284, 2)) == "72.0 ± 2.8"
    assert build.fmt(build.Cell(66.0, None, 1)) == "66.0"
    assert build.fmt(build.Cell()) == "—"


def test_cli_tables_on_a_full_disk_is_one_line_naming_the_path(store, full_disk):
    res = CliRunner().invoke(app, ["tables", "--tracking-uri", store, "--out", str(full_disk / "t")])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no space left on {full_disk}/t"), lines
    assert not [p for p in full_disk.rglob("*") if p.is_file() and p.name != "filler"]  # no half-written table


def test_fig9_shows_the_archive_then_non_homogeneous_bar(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    _run(c, "pretrain_strategy", table="fig9", homogeneous_share="0.1", trial_key="a", end=1, metrics={"test/mIoU": 0.45})
    _run(c, "pretrain_strategy", table="fig9", homogeneous_share="0.1", homogeneous_source="gid", trial_key="b", end=2,
         metrics={"test/mIoU": 0.41})
    r = build_all(uri, tmp_path / "t")
    f9 = r.built["fig9"]
    assert f9.cell("two_step", "mIoU").mean == pytest.approx(45.0)
    assert f9.cell("archive_non_homogeneous", "mIoU").mean == pytest.approx(41.0)
    assert "archive, then non-homogeneous (another sensor)" in (tmp_path / "t" / "fig9.md").read_text()


def test_table4_has_segformer_run_here_beside_the_published_row(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    _run(c, "sota_minifrance", table="table4", method="segformer", frozen="false", head="segformer", trial_key="s", end=1,
         metrics={"test/mIoU": 0.31, "test/IoU/UB": 0.52, "params/trainable": 64_002_252})
    _run(c, "sota_minifrance", table="table4", trial_key="d", end=2, metrics={"test/mIoU": 0.43, "test/IoU/UB": 0.6})
    r = build_all(uri, tmp_path / "t")
    t4 = r.built["table4"]
    assert t4.n_runs == 2
    assert t4.cell("segformer/0.02", "mIoU").mean == pytest.approx(31.0)
    assert t4.cell("segformer/0.02", "UB").mean == pytest.approx(52.0)
    md = (tmp_path / "t" / "table4.md").read_text()
    assert "SegFormer-B4 (paper) | 64.7 |" in md
    line = next(l for l in md.splitlines() if "run here" in l and "MiniFrance-S" in l)
    assert "| 31.0 |" in line and "64.0" in line, line


def test_the_tags_and_the_tables_spell_ratios_one_way_and_record_what_the_user_wrote():
    """Table 3's and 4's keys are the label-ratio tags as runs write them (`ratio_tag`, one
    spelling); the homogeneous share is the ratio the user wrote, not one recomputed from the
    rounded iteration counts (7 iterations at 0.5: 4 homogeneous, and the tag still says 0.5)."""
    from conftest import tiny_run
    from rsseg.resolved import resolve
    from rsseg.tables.layouts import RATIOS

    tags = [resolve(tiny_run(data={"label_ratio": r})).tags("finetune").label_ratio for r in (0.02, 0.4, 1.0)]
    assert tags == list(RATIOS) == ["0.02", "0.4", "1"]
    odd = tiny_run(pretrain={"iterations": {"total": 7, "homogeneous_ratio": 0.5, "archive": None, "homogeneous": None}})
    assert odd.pretrain.iterations.counts() == (3, 4)
    assert resolve(odd).tags("finetune").homogeneous_share == "0.5"
    written = tiny_run(pretrain={"iterations": {"archive": 3, "homogeneous": 4}})  # counts written: the share is theirs
    assert resolve(written).tags("finetune").homogeneous_share == f"{4 / 7:g}"
