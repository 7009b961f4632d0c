"""The paper's numbers typed into baselines/ match the paper's text: its lines shipped in
tests/data/paper_excerpt.txt (any clone), themselves checked against ../shared/paper/ where it is."""

import csv
from importlib import resources

import pytest

from conftest import REPO

PAPER = REPO.parent / "shared" / "paper" / "luo2025-label-efficient-rs-diffusion.txt"
EXCERPT = REPO / "tests" / "data" / "paper_excerpt.txt"


def _excerpt_lines() -> list[str]:
    return [line for line in EXCERPT.read_text().splitlines() if not line.startswith("# ")]


def _rows():
    text = (resources.files("rsseg_baselines.published") / "paper_tables.csv").read_text()
    return list(csv.DictReader(text.splitlines()))


def _printed(v: str) -> str:
    return v if "." in v and len(v.split(".")[1]) > 1 else f"{float(v):.1f}"


def _series(table: str, row: str, skip=("ft_params_M",)) -> str:
    return "".join(_printed(r["value"]) for r in _rows() if r["table"] == table and r["row"] == row and r["column"] not in skip)


@pytest.fixture(scope="module")
def text():
    return "\n".join(_excerpt_lines())


@pytest.mark.skipif(not PAPER.exists(), reason=f"{PAPER} not beside the checkout")
def test_the_excerpt_is_verbatim_from_the_paper():
    paper = set(PAPER.read_text().splitlines())
    lines = _excerpt_lines()
    assert len(lines) >= 20 and all(line in paper for line in lines), [line[:60] for line in lines if line not in paper]


@pytest.mark.parametrize("table", ["table2", "table4", "table5"])
def test_per_class_rows_as_printed(text, table):
    """Each row's per-class IoU and mIoU, concatenated as the text extraction prints them."""
    rows = sorted({r["row"] for r in _rows() if r["table"] == table})
    assert len(rows) >= 6
    for row in rows:
        assert _series(table, row) in text, (table, row)


def test_table1_and_table3_cells(text):
    assert _series("table1", "mlp", skip=()) in text.replace("MLP segmentor", "")  # 35.440.6...42.716.3
    assert "Fine-tuning" + _series("table3", "scalemae/finetuned", skip=()) in text  # 42.644.245.096.1
    assert "Random-init (ConvNeXt-B [71]) " + _series("table3", "convnext_random/finetuned", skip=()) in text
    t3 = {(r["row"], r["column"]): float(r["value"]) for r in _rows() if r["table"] == "table3"}
    assert (t3[("ddpm/frozen", "0.02")], t3[("ddpm/finetuned", "1")]) == (42.7, 48.6)  # also stated in Section 4


def test_figure9_values_from_text(text):
    assert "achieved a 40.0% mIoU" in text and "5.7% higher than pre-training using ImageNet" in text
    fig9 = {r["row"]: float(r["value"]) for r in _rows() if r["table"] == "fig9"}
    assert fig9 == {"archive_only": 40.0, "two_step": 42.7, "imagenet": pytest.approx(40.0 - 5.7)}


def test_every_row_names_its_source():
    assert all(r["source"].startswith("Luo et al. 2025") for r in _rows())
