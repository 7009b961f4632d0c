"""The bill before the sweep: device-hours per stage in --dry-run, from FLOP counts on the meta
device and a rate (assumed, or measured by bench/gpu_check.py)."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO, tiny_run
from rsseg.cli import app
from rsseg.errors import ConfigError
from rsseg.flops import unit_flops
from rsseg.sweep.cost import ASSUMED_PEAK_TFLOPS, ASSUMED_UTILISATION, RATES_KIND, Rates

NOISE = str(REPO / "sweeps" / "noise_ablation.yaml")
STAGES = ("pre-training", "feature extraction", "fine-tuning", "evaluation")


def hours(output: str) -> dict[str, float]:
    found = {}
    for stage in (*STAGES, "total"):
        m = re.search(rf"^  {stage} .*?([\d.]+) h", output, re.M)
        assert m, f"no {stage} line in:\n{output}"
        found[stage] = float(m.group(1))
    return found


def dry_run(workdir, *extra):
    return CliRunner().invoke(app, ["--workdir", str(workdir.root), "sweep", NOISE, "--profile", "paper", "--dry-run", *extra])


def test_the_paper_dry_run_prints_device_hours_per_stage_from_assumed_rates(workdir, monkeypatch):
    monkeypatch.setenv("RSSEG_DATA", str(workdir.root / "nowhere"))
    out = dry_run(workdir)
    assert out.exit_code == 0, out.output
    h = hours(out.output)
    assert all(h[s] > 0 for s in STAGES) and h["total"] == pytest.approx(sum(h[s] for s in STAGES), abs=0.02)
    assert f"FLOP counts at {ASSUMED_UTILISATION:.0%} of an assumed {ASSUMED_PEAK_TFLOPS:g} TFLOP/s" in out.output
    assert "1.60 M images" in out.output  # 200 000 iterations x batch 8, one pre-training for 18 trials
    assert "43,200 training samples" in out.output  # 18 trials x 300 iterations x 8
    assert "the paper's MiniFrance" in out.output  # tile counts from the paper's description: the data is not here
    # the pre-training's hours: images x FLOPs per image / the assumed rate
    m = re.search(r"pre-training\s+1\.60 M images\s+([\d.]+) TFLOP each", out.output)
    assert h["pre-training"] == pytest.approx(1.6e6 * float(m.group(1)) * 1e12 / (ASSUMED_PEAK_TFLOPS * 1e12 * ASSUMED_UTILISATION) / 3600,
                                              rel=0.01)


def test_a_rates_file_from_gpu_check_sets_each_stage_rate(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("RSSEG_DATA", str(workdir.root / "nowhere"))
    assumed = hours(dry_run(workdir).output)
    rate = ASSUMED_PEAK_TFLOPS * ASSUMED_UTILISATION
    doc = {"kind": RATES_KIND, "version": 1, "device": "NVIDIA H100 80GB HBM3", "date": "2026-12-06 12:00",
           "stages": {"pretrain": {"tflops": 2 * rate}, "extraction": {"tflops": rate / 2}, "finetune": {"tflops": rate}}}
    f = tmp_path / "rates.json"
    f.write_text(json.dumps(doc))
    out = dry_run(workdir, "--rates", str(f))
    assert out.exit_code == 0, out.output
    measured = hours(out.output)
    assert measured["pre-training"] == pytest.approx(assumed["pre-training"] / 2, abs=0.02)
    assert measured["feature extraction"] == pytest.approx(assumed["feature extraction"] * 2, abs=0.02)
    assert measured["evaluation"] == assumed["evaluation"]  # not measured there: the assumed rate, and it says so
    assert "rates measured on NVIDIA H100 80GB HBM3 (2026-12-06 12:00" in out.output and "evaluation not measured there" in out.output


@pytest.mark.parametrize("content,message", [
    ("{not json", r"not a rates file \(invalid JSON at line 1\)"),
    (json.dumps({"stages": {}}), r"not a rates file \(expected kind: rsseg-rates"),
    (json.dumps({"kind": RATES_KIND, "stages": {"pretrain": {"tflops": -1}}}), r"stages.pretrain.tflops: expected a positive number, got -1"),
])
def test_a_bad_rates_file_is_one_line(content, message, tmp_path, workdir):
    f = tmp_path / "r.json"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message):
        Rates.load(f)
    out = dry_run(workdir, "--rates", str(f))
    assert out.exit_code == 2 and out.output.startswith("error: ") and out.output.count("\n") == 1, out.output
    assert str(f) in out.output


def test_rates_without_dry_run_is_refused(workdir, tmp_path):
    out = CliRunner().invoke(app, ["--workdir", str(workdir.root), "sweep", NOISE, "--rates", str(tmp_path / "r.json")])
    assert out.exit_code == 2 and "--rates" in out.output and "only read by --dry-run" in out.output


def test_flops_counted_on_the_meta_device_equal_the_real_networks_count():
    """The dry run's FLOPs per (tile, timestep) pass and per head step, against the same counter
    on the real (CPU) networks of a tiny run."""
    from torch.utils.flop_counter import FlopCounterMode

    from rsseg.heads import build_head
    from rsseg.methods.ddpm.encoder import skeleton

    run = tiny_run(ddpm={"features": {"timesteps": [50, 100]}})
    units = unit_flops(run, 3, 7, run.head_name)
    torch.manual_seed(0)
    enc = skeleton(run, 3).freeze()
    head = build_head("mlp", enc.feature_info, 7, run.finetune)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with FlopCounterMode(display=False) as c, torch.no_grad():
        feats = enc(x, ["a", "b"], [0, 0])
    # (within 0.1 %: attention may take another kernel on the host than on the meta device)
    assert units.extraction == pytest.approx(c.get_total_flops() / 2 / 2, rel=1e-3)  # 2 tiles x 2 timesteps
    with FlopCounterMode(display=False) as c:
        head.loss(feats, head(feats, (32, 32)), torch.zeros(2, 32, 32, dtype=torch.long)).backward()
    assert units.finetune == pytest.approx(c.get_total_flops() / 2, rel=1e-3)
