"""Why the demo's numbers move between two CPU machines: the same seeded pre-training steps (the
smoke profile's tiny UNet, 64 px, batch 8) in fresh processes under different CPU kernel paths and
thread counts, compared bit for bit.

    python bench/repro_kernels.py [--steps 200] [--append]

Each variant is a subprocess with its environment: the default (this CPU's best kernels), the
same again (control: a process repeats itself exactly), AVX2 kernels only (ATen's
ATEN_CPU_CAPABILITY, oneDNN's ONEDNN_MAX_CPU_ISA and MKL's MKL_ENABLE_INSTRUCTIONS: what a CPU
without AVX-512 runs), and 1 thread instead of 2. Printed: whether the final weights equal the
default's, the largest weight difference, and the loss at a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
STEP = """
import json, sys, hashlib, torch
sys.path.insert(0, "platform")
from rsseg.runspec import RunSpec
from rsseg.methods.ddpm.objective import build_objective
steps, threads, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(threads)
torch.manual_seed(0)
run = RunSpec(data={"tile_size": 64}, ddpm={"unet": {"preset": "tiny"}})
obj = build_objective(run, 3)
net = obj.network
opt = torch.optim.AdamW(net.parameters(), lr=5e-4)
g = torch.Generator().manual_seed(1)
x = torch.rand(64, 3, 64, 64, generator=g) * 2 - 1
losses = {}
for i in range(steps):
    batch = x[(torch.arange(8) + 8 * i) % 64]
    loss, _ = obj.loss(net, batch, torch.Generator().manual_seed(i))
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step()
    if i in (0, 9, 49, 99, 199, 499, 999) or i == steps - 1:
        losses[i + 1] = float(loss.detach())
torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, out + ".pt")
json.dump({"losses": losses, "capability": torch.backends.cpu.get_cpu_capability()}, open(out + ".json", "w"))
"""
sys.path.insert(0, str(REPO / "platform"))
from rsseg.kernels import PINNED, VARIABLES  # noqa: E402 - the variables runtime.cpu_kernels: avx2 sets

AVX2 = PINNED["avx2"]
VARIANTS = {"default, 2 threads": ({}, 2), "default, 2 threads (again)": ({}, 2), "AVX2 kernels, 2 threads": (AVX2, 2),
            "default, 1 thread": ({}, 1)}


def main() -> None:
    import tempfile

    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--append", action="store_true", help="append the table to docs/benchmarks.md")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="repro-"))
    results = {}
    for i, (name, (env, threads)) in enumerate(VARIANTS.items()):
        out = str(d / f"v{i}")
        subprocess.run([sys.executable, "-c", STEP, str(args.steps), str(threads), out], cwd=REPO, check=True,
                       env={**{k: v for k, v in os.environ.items() if k not in VARIABLES}, **env})
        results[name] = (torch.load(out + ".pt"), json.loads(Path(out + ".json").read_text()))
    ref, _ = results["default, 2 threads"]
    lines = [f"{args.steps} seeded steps of the smoke profile's tiny UNet on the DDPM loss (batch 8, 64 px, AdamW 5e-4), "
             "a fresh process per variant; weights compared bit for bit with the first.", "",
             "| variant | kernels | final weights vs the first | max abs difference | loss at the last step |", "|---|---|---|---:|---:|"]
    for name, (w, info) in results.items():
        diff = max(float((w[k].float() - ref[k].float()).abs().max()) for k in ref)
        same = all(torch.equal(w[k], ref[k]) for k in ref)
        last = list(info["losses"].values())[-1]
        lines.append(f"| {name} | {info['capability']} | {'identical' if same else 'differ'} | {diff:.2e} | {last:.6f} |")
    print("\n".join(lines))
    if args.append:
        from common import append

        append("Reproducibility: the same pre-training steps under other CPU kernels and thread counts", "\n".join(lines))


if __name__ == "__main__":
    main()
