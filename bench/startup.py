"""Start-up overhead of the CLI (issue: feature passes and start-up): whole-process wall times,
median of several runs, each in a fresh work directory, against a bare process doing the same
training steps (torch + diffusers only: no Ray, no MLflow, no platform).

- ``platform --version``
- ``platform pretrain`` of 20 smoke iterations (tiny UNet, 64 px) with 1 worker (Ray Train's
  local mode: one process) and with 2 (worker actors, DDP) vs a bare process running the same 20
  DDPM steps at the same batch
- a 1-trial sweep (random-weight DDPM features, 20 fine-tuning iterations) vs a bare process
  fine-tuning the same run in-process (no Ray, no MLflow)

``--previous DIR`` also times the same commands in another checkout (with its own .venv), e.g. the
previous commit, side by side.

The runs share one fresh user cache (``RSSEG_CACHE_DIR``): the first ``platform`` command of the
benchmark creates the MLflow store template that later fresh work directories copy
(rsseg.tracking.template_path), as on a user's machine; the per-run columns show both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_20 = ["--set", "pretrain.iterations.total=20", "--set", "ddpm.optim.warmup_iterations=5",
               "--set", "pretrain.runtime.checkpoint_every=10", "--set", "pretrain.runtime.samples=0"]
SWEEP = """name: startup
base:
  method: ddpm
  data: {tile_size: 64, synthetic: {scenes: 4, size: 256}}
  ddpm: {unet: {preset: tiny}, features: {weights: random, timesteps: [50, 100]}}
  finetune: {iterations: 20, eval_every: 20, batch_size: 8, val_max_tiles: 16, log_predictions: 0, threads: 2}
space: {seed: {grid: [0]}}
search: {algorithm: grid, max_concurrent: 1, resources: {cpu: 2}}
"""

BARE_PRETRAIN = """
import sys, time, torch
sys.path.insert(0, "platform")
from rsseg.runspec import RunSpec
from rsseg.methods.ddpm.objective import build_objective
torch.set_num_threads(2)
run = RunSpec(data={"tile_size": 64}, ddpm={"unet": {"preset": "tiny"}})
obj = build_objective(run, 3)
net = obj.network
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
x = torch.rand(8, 3, 64, 64) * 2 - 1
for i in range(20):
    loss, _ = obj.loss(net, x, torch.Generator().manual_seed(i))
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step()
"""

BARE_FINETUNE = """
import sys, torch
sys.path.insert(0, "platform")
from rsseg import finetune
from rsseg.runspec import load_sweep
from rsseg.workdir import Workdir
loaded = load_sweep(sys.argv[1])
finetune.run(loaded.base, Workdir.resolve(sys.argv[2]).ensure())
"""


CACHE = tempfile.mkdtemp(prefix="rsbench-cache-")


def wall(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "RSSEG_CACHE_DIR": CACHE})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd}: {(out.stdout + out.stderr)[-1500:]}")
    return time.perf_counter() - t0


def median_of(n: int, make_cmd, cwd: Path) -> tuple[float, list[float]]:
    times = []
    for _ in range(n):
        with tempfile.TemporaryDirectory(dir="/tmp", prefix="rsbench-") as d:
            times.append(wall(make_cmd(Path(d)), cwd))
    return statistics.median(times), times


def measure(checkout: Path, runs: int, bare: bool = True) -> dict[str, tuple[float, list[float]]]:
    """The platform commands of ``checkout``; with ``bare``, also the bare processes (this checkout's
    code: they are the same steps whatever the commit)."""
    py, platform = str(REPO / ".venv" / "bin" / "python"), str(checkout / ".venv" / "bin" / "platform")
    sweep_file = Path(tempfile.mkdtemp(prefix="rsbench-sweep-")) / "startup.yaml"
    sweep_file.write_text(SWEEP)
    out = {"platform --version": median_of(runs, lambda d: [platform, "--version"], checkout)}
    if bare:
        out["python -c 'import torch' (floor)"] = median_of(runs, lambda d: [py, "-c", "import torch"], REPO)
    for workers in (1, 2):  # one worker: Ray Train's local mode (this process); two: worker actors, DDP
        out[f"platform pretrain, 20 iterations, {workers} worker{'s' if workers > 1 else ''}"] = median_of(
            runs, lambda d: [platform, "--workdir", str(d / "w"), "pretrain", "sweeps/pretrain.yaml", "--profile", "smoke",
                             *PRETRAIN_20, "--workers", str(workers)], checkout)
    if bare:
        out["bare process, the same 20 steps"] = median_of(runs, lambda d: [py, "-c", BARE_PRETRAIN], REPO)
    try:
        out["platform sweep, 1 trial"] = median_of(runs, lambda d: [platform, "--workdir", str(d / "w"), "sweep", str(sweep_file)], checkout)
    except RuntimeError as exc:  # an older checkout whose schema differs
        print(f"{checkout}: 1-trial sweep not comparable ({str(exc)[-200:]})", file=sys.stderr)
    if bare:
        out["bare process, the same fine-tuning"] = median_of(runs, lambda d: [py, "-c", BARE_FINETUNE, str(sweep_file), str(d / "w")], REPO)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--previous", type=Path, help="another checkout (with .venv) to time side by side")
    args = ap.parse_args()
    now = measure(REPO, args.runs)
    before = None
    if args.previous is not None:
        try:
            before = measure(args.previous.resolve(), args.runs, bare=False)
        except RuntimeError as exc:
            print(f"previous checkout: {exc}", file=sys.stderr)
    cols = "| command | this commit (median s) | runs |" + (" previous checkout (median s) | runs |" if before else "")
    lines = [f"Whole-process wall times, {args.runs} runs each in a fresh work directory (median).", "", cols,
             "|---|---:|---|" + ("---:|---|" if before else "")]
    for k, (m, ts) in now.items():
        row = f"| {k} | {m:.1f} | {', '.join(f'{t:.1f}' for t in ts)} |"
        if before and k in before:
            row += f" {before[k][0]:.1f} | {', '.join(f'{t:.1f}' for t in before[k][1])} |"
        lines.append(row)

    bare_pre, bare_ft = now["bare process, the same 20 steps"][0], now["bare process, the same fine-tuning"][0]

    def overhead(d, key, base):
        return f"{d[key][0] - base:.0f} s" if key in d else "n/a"

    one, two = "platform pretrain, 20 iterations, 1 worker", "platform pretrain, 20 iterations, 2 workers"
    lines += ["", "Start-up overhead (platform minus the bare process): pre-training with 1 worker "
              f"{overhead(now, one, bare_pre)} (2 workers {overhead(now, two, bare_pre)}), 1-trial sweep "
              f"{overhead(now, 'platform sweep, 1 trial', bare_ft)}"
              + (f"; previous checkout: {overhead(before, one, bare_pre)} ({overhead(before, two, bare_pre)}) and "
                 f"{overhead(before, 'platform sweep, 1 trial', bare_ft)}" if before else "") + "."]
    append("CLI start-up overhead: platform commands vs bare processes", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
