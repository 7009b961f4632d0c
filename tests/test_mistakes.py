"""Mistakes people make, each run as the user types it (the CLI, in-process): every one is a single
`error: ...` line naming the file, key or value, with exit status 2 — or, where the input is
legal but suspicious, a `warning: ...` line and the command going on. `python tests/test_mistakes.py`
prints the tally by category (one line / warning / unclear / multi-line / silent / traceback)
that the issue's review counted."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import REPO  # noqa: E402
from rasters import write_folder_dataset, write_tif  # noqa: E402

SWEEP = str(REPO / "sweeps" / "noise_ablation.yaml")


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # after `platform --workdir W`; {T} is the case's own folder
    expect: str  # text the line must hold ({T} substituted)
    kind: str = "error"  # error: one `error:` line, exit 2; warning: a `warning:` line, exit 0


def _setup(t: Path) -> None:
    """The files the cases name: a good folder dataset, and the broken things next to it."""
    write_folder_dataset(t / "own")
    write_folder_dataset(t / "mixed")
    write_tif(t / "mixed" / "images" / "d.tif", np.ones((4, 64, 64)))
    (t / "bad.yaml").write_text("name: x\nbase: {method: ddpm\n")
    (t / "typo.yaml").write_text("name: x\nbase: {method: ddpm}\nspace: {seed: {grid: [0]}}\nserach: {algorithm: grid}\n")
    (t / "run.yaml").write_text("method: ddpm\nfinetune: {iterations: 10}\n")
    (t / "dup.yaml").write_text("method: ddpm\nfinetune: {iterations: 10}\nfinetune: {lr: 0.1}\n")
    (t / "list.yaml").write_text("- a\n- b\n")
    (t / "adir.yaml").mkdir()
    (t / "notes.txt").write_text("not a model")
    (t / "fake.db").write_text("not sqlite")
    (t / "afile").write_text("x")
    (t / "own" / "masks" / "orphan.tif").write_bytes((t / "own" / "masks" / "a.tif").read_bytes())


CASES = [
    # the command line itself
    Case("unknown command", ("sweeep", SWEEP), "No such command 'sweeep'"),
    Case("unknown option", ("sweep", SWEEP, "--dryrun"), "No such option: --dryrun"),
    Case("missing argument", ("sweep",), "Missing argument 'file'"),
    Case("option without its value", ("sweep", SWEEP, "--profile"), "--profile"),
    Case("port not a number", ("ui", "--port", "abc"), "Invalid value for '--port'"),
    Case("port out of range", ("ui", "--port", "0"), "--port 0: expected a port number from 1 to 65535"),
    Case("too many UI workers", ("ui", "--workers", "500"), "--workers 500"),
    # sweep and run files
    Case("sweep file missing", ("sweep", "{T}/nope.yaml"), "{T}/nope.yaml"),
    Case("sweep file is a folder", ("sweep", "{T}/adir.yaml"), "{T}/adir.yaml"),
    Case("YAML syntax error", ("sweep", "{T}/bad.yaml"), "{T}/bad.yaml"),
    Case("misspelt top-level key", ("sweep", "{T}/typo.yaml"), "serach"),
    Case("a run spec given to sweep", ("sweep", "{T}/run.yaml"), "not a sweep file"),
    Case("a sweep given to finetune", ("finetune", SWEEP), SWEEP),
    Case("YAML that is a list", ("config", "show", "{T}/list.yaml"), "{T}/list.yaml"),
    Case("key given twice", ("config", "show", "{T}/dup.yaml"), "finetune"),
    Case("unknown profile", ("sweep", SWEEP, "--profile", "smok", "--dry-run"), "did you mean 'smoke'?"),
    Case("--set without =", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "finetune.iterations"), "finetune.iterations"),
    Case("--set of an unknown key", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "finetune.iteration=5"),
         "finetune.iteration"),
    Case("--set of a wrong type", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "finetune.iterations=many"),
         "finetune.iterations"),
    Case("negative iterations", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "finetune.iterations=-5"),
         "finetune.iterations"),
    Case("label ratio above 1", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "data.label_ratio=1.5"), "label_ratio"),
    Case("tile size too small", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "data.tile_size=4"), "tile_size"),
    Case("unknown dataset", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "data.dataset=imagenet"), "imagenet"),
    Case("unknown device", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "runtime.device=tpu"), "tpu"),
    Case("homogeneous ratio above 1", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set",
                                       "pretrain.iterations={total: 100, homogeneous_ratio: 2}"), "homogeneous_ratio"),
    Case("unknown search algorithm", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "search.algorithm=bayes"), "bayes"),
    Case("no concurrent trial", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "search.max_concurrent=0"),
         "max_concurrent"),
    Case("an axis given as a list", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "space.seed=[0, 1]"),
         "expected an axis such as {grid: [...]}"),
    Case("an axis of two kinds", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "space.seed={grid: [0], choice: [1]}"),
         "exactly one of grid"),
    Case("a timestep beyond the schedule", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set",
                                            "space.ddpm.features.timesteps.grid=[[2000]]"), "timestep 2000 is outside the schedule's 0..999"),
    Case("an empty grid", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "space.seed.grid=[]"), "grid is empty"),
    Case("a table the platform does not build", ("sweep", SWEEP, "--profile", "smoke", "--dry-run", "--set", "table=table9"),
         "unknown table 'table9'"),
    Case("--rates without --dry-run", ("sweep", SWEEP, "--profile", "smoke", "--rates", "{T}/r.json"), "only read by --dry-run"),
    # data
    Case("dataset root missing", ("data", "info", "folder", "--root", "{T}/nowhere"), "{T}/nowhere"),
    Case("folder without classes.yaml", ("data", "info", "folder", "--root", "{T}"), "classes.yaml"),
    Case("a mask without its image", ("data", "info", "folder", "--root", "{T}/own", "--tile-size", "32"), "orphan"),
    Case("images of different band counts", ("data", "info", "folder", "--root", "{T}/mixed", "--tile-size", "32"),
         "{T}/mixed/images/d.tif: has 4 band(s)"),
    Case("a band the images lack", ("data", "info", "synthetic", "--set", "bands=[5,2,1]"), "asks for band 5"),
    Case("unknown data option", ("data", "info", "synthetic", "--set", "tilesize=32"), "tilesize"),
    Case("unknown dataset name", ("data", "info", "imagenet"), "imagenet"),
    # everything else
    Case("workdir is a file", ("--workdir", "{T}/afile", "data", "info", "synthetic"), "{T}/afile: is a file"),
    Case("tables of an unknown profile", ("tables", "--profile", "smok", "--out", "{T}/t"), "did you mean 'smoke'?"),
    Case("tables of a damaged store", ("tables", "--tracking-uri", "{T}/fake.db", "--out", "{T}/t"), "{T}/fake.db"),
    Case("predict with a model that does not exist", ("predict", "runs:/0123456789abcdef", "{T}/own/images/a.tif", "-o", "{T}/o"),
         "runs:/0123456789abcdef"),
    Case("predict a model path that is a text file", ("predict", "{T}/notes.txt", "{T}/own/images/a.tif", "-o", "{T}/o"),
         "{T}/notes.txt"),
    Case("predict into a file", ("predict", "runs:/x", "{T}/own/images/a.tif", "-o", "{T}/afile"), "--out {T}/afile: a file"),
    Case("predict bands not numbers", ("predict", "runs:/x", "{T}/own/images/a.tif", "-o", "{T}/o", "--bands", "r,g,b"),
         "--bands r,g,b"),
    Case("predict a reversed value range", ("predict", "runs:/x", "{T}/own/images/a.tif", "-o", "{T}/o", "--value-range", "255,0"),
         "--value-range 255,0"),
    Case("predict dataset:N not a number", ("predict", "runs:/x", "dataset:one", "-o", "{T}/o"), "dataset:one"),
    Case("viz of negative timesteps", ("viz", SWEEP, "--profile", "smoke", "--timesteps=-10,50"), "-10"),
    Case("weights import of an unknown format", ("weights", "import", "{T}/notes.txt", "--name", "n", "--format", "onnx"), "onnx"),
    Case("evaluate a model that does not exist", ("evaluate", "runs:/x", "--data", "synthetic"), "runs:/x: no run 'x'"),
]


def classify(exit_code: int, output: str, exception: BaseException | None, case: Case, t: Path) -> str:
    """What the user saw: one line (the expected text in it) / warning / unclear (one line without
    it) / multi-line / silent (exit 0, nothing said) / traceback."""
    if exception is not None and not isinstance(exception, SystemExit):
        return "traceback"
    expect = case.expect.replace("{T}", str(t))
    # a profile's changes to the user's file are announced first, one line each (not part of an error)
    lines = [ln for ln in output.strip().splitlines() if ln.strip() and not re.match(r"profile \S+ changes ", ln)]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if exit_code == 0:
        warned = [ln for ln in lines if ln.startswith("warning: ") and expect in ln]
        return "warning" if warned else "silent"
    if len(lines) != 1 or not errors:
        return "multi-line"
    return "one line" if expect in errors[0] and exit_code == 2 else "unclear"


def run_case(case: Case, t: Path):
    from typer.testing import CliRunner

    from rsseg.cli import app

    args = [a.replace("{T}", str(t)) for a in case.args]
    if args[0] != "--workdir":
        args = ["--workdir", str(t / "w")] + args
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    t = tmp_path_factory.mktemp("mistakes")
    _setup(t)
    return t


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_mistake_is_one_line_naming_what_is_wrong(case, folder, monkeypatch):
    monkeypatch.chdir(folder)
    res = run_case(case, folder)
    seen = classify(res.exit_code, res.output, res.exception, case, folder)
    assert seen == ("one line" if case.kind == "error" else "warning"), (seen, res.exit_code, res.output[-2000:], repr(res.exception))


def tally() -> dict[str, list[str]]:
    import tempfile

    out: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as d:
        t = Path(d)
        _setup(t)
        os.chdir(t)
        for case in CASES:
            res = run_case(case, t)
            out.setdefault(classify(res.exit_code, res.output, res.exception, case, t), []).append(case.name)
    return out


if __name__ == "__main__":  # python tests/test_mistakes.py: the tally
    sys.path.insert(0, str(REPO / "platform"))
    counts = tally()
    print(f"{sum(len(v) for v in counts.values())} mistakes:")
    for kind, names in sorted(counts.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(names):3d}  {kind}" + ("" if kind in ("one line", "warning") else ": " + "; ".join(names)))
