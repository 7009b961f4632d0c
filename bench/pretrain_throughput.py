"""Pre-training throughput (issue: DDPM pre-training).

- CPU, tiny UNet: images/s and seconds per iteration of the real training step (rsseg's DDPM
  objective + AdamW + clipping), 2 threads, at the smoke profile's 64 px and at 256 px.
- FLOPs per training iteration and per forward for ho256 and sr3 at 256 px (torch's FLOP counter
  on the meta device: exact, machine-independent).
- On a CUDA machine (bench/gpu_pretrain.py, torch + diffusers only): images/s with bf16 and the
  fraction of the measured bf16 matmul peak. Target on an H100-class GPU: >= 35 %.
"""

from __future__ import annotations

import json
import subprocess
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
    rows = [cpu_step_rate(64), cpu_step_rate(256, batch=4, iters=5)]
    gpu = subprocess.run([sys.executable, str(Path(__file__).parent / "gpu_pretrain.py"), "--presets", "tiny", "ho256", "sr3"],
                         capture_output=True, text=True, check=True)
    g = json.loads(gpu.stdout.strip().splitlines()[-1])
    lines = ["Training step = DDPM epsilon loss, backward, clip, AdamW (the trainer's step without Ray).", "",
             "| UNet | device | input | batch | s/iteration | images/s |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| tiny | CPU, 2 threads | {r['size']}² | {r['batch']} | {r['seconds_per_iteration']:.3f} | {r['images_per_s']:.1f} |")
    lines += ["", "FLOPs per training iteration (forward + backward, batch 8, 256², torch FLOP counter):", "",
              "| UNet | train GFLOP / iteration | forward GFLOP / image |", "|---|---:|---:|"]
    for p, r in g["presets"].items():
        lines.append(f"| {p} | {r['train_flops_per_iteration'] / 1e9:,.0f} | {r['forward_flops_per_image'] / 1e9:,.1f} |")
    if "gpu" in g:
        lines += ["", f"GPU {g['gpu']}: measured bf16 matmul peak {g['bf16_matmul_peak_tflops']:.0f} TFLOP/s.", "",
                  "| UNet | s/iteration | images/s | fraction of bf16 peak | max memory (GiB) |", "|---|---:|---:|---:|---:|"]
        for p, r in g["presets"].items():
            lines.append(f"| {p} | {r['seconds_per_iteration']:.3f} | {r['images_per_s']:.1f} | {100 * r['fraction_of_peak']:.0f} % | {r['max_memory_gib']:.1f} |")
    else:
        lines += ["", "No CUDA device on this machine: GPU images/s and the fraction of the bf16 peak were not measured here. "
                  "On a GPU box run `python bench/gpu_pretrain.py` (torch + diffusers only) and add its figures."]
    append("Pre-training throughput", "\n".join(lines))


if __name__ == "__main__":
    main()
