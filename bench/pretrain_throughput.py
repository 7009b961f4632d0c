"""Pre-training throughput (issue: DDPM pre-training).

- CPU, tiny UNet: images/s and seconds per iteration of the real training step (rsseg's DDPM
  objective + AdamW + clipping), 2 threads, at the smoke profile's 64 px and at 256 px.
- FLOPs per training image (forward + backward) of the presets tiny, ho256 and sr3 at 256 px, as
  the dry run's device-hours count them (`rsseg.flops`, torch's FLOP counter on the meta device:
  exact, machine-independent).
- GPU figures (images/s with bf16 and EMA through the real Trainer, % of the measured bf16 peak)
  come from bench/gpu_check.py on a GPU machine. Target on an H100-class GPU: >= 35 %.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append  # noqa: E402


def cpu_step_rate(size: int, batch: int = 8, iters: int = 15) -> dict:
    from rsseg.runspec import RunSpec
    from rsseg.methods.ddpm.objective import build_objective

    torch.set_num_threads(2)
    run = RunSpec(data={"tile_size": size}, ddpm={"unet": {"preset": "tiny"}})
    torch.manual_seed(0)
    obj = build_objective(run, 3)
    net = obj.network
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size) * 2 - 1

    def step(i):
        loss, _ = obj.loss(net, x, torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    for i in range(3):
        step(i)
    t0 = time.perf_counter()
    for i in range(iters):
        step(i)
    dt = (time.perf_counter() - t0) / iters
    return {"size": size, "batch": batch, "seconds_per_iteration": dt, "images_per_s": batch / dt}


def main() -> None:
    from rsseg.flops import pretrain_flops
    from rsseg.runspec import RunSpec

    rows = [cpu_step_rate(64), cpu_step_rate(256, batch=4, iters=5)]
    lines = ["Training step = DDPM epsilon loss, backward, clip, AdamW (the trainer's step without Ray).", "",
             "| UNet | device | input | batch | s/iteration | images/s |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| tiny | CPU, 2 threads | {r['size']}² | {r['batch']} | {r['seconds_per_iteration']:.3f} | {r['images_per_s']:.1f} |")
    lines += ["", "FLOPs per training image (forward + backward, 256², `rsseg.flops.pretrain_flops`, what the dry run counts):", "",
              "| UNet | train GFLOP / image |", "|---|---:|"]
    for preset, schedule in (("tiny", "ddpm"), ("ho256", "ddpm"), ("sr3", "ddpm_cd")):
        run = RunSpec(data={"tile_size": 256}, ddpm={"unet": {"preset": preset}, "schedule": {"preset": schedule}})
        lines.append(f"| {preset} | {pretrain_flops(run, 3) / 1e9:,.0f} |")
    lines += ["", "GPU images/s and the fraction of the bf16 peak: `python bench/gpu_check.py` on a GPU machine (docs/benchmarks.md, "
              "GPU check)."]
    append("Pre-training throughput", "\n".join(lines))


if __name__ == "__main__":
    main()
