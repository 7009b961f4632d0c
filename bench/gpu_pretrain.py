"""Standalone pre-training throughput probe: needs only torch + diffusers (runs on a GPU box
without the rest of rsseg). Prints one JSON line.

    python bench/gpu_pretrain.py [--presets ho256 sr3] [--batch 8] [--size 256] [--iters 20]

Per preset: FLOPs per training iteration (forward + backward, torch's FLOP counter, on the meta
device: exact and machine-independent), and where CUDA is present: images/s with bf16 autocast,
the measured bf16 matmul peak of this GPU and the fraction of it the training step reaches.
The UNet configs are copied from rsseg.pretrain.unet so this file has no rsseg import.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

PRESETS = {
    "tiny": dict(block_out_channels=(32, 32, 64, 64, 128), down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D",),
                 up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 4, layers_per_block=2, norm_num_groups=8, attention_head_dim=32),
    "ho256": dict(block_out_channels=(128, 128, 256, 256, 512, 512), down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, layers_per_block=2, attention_head_dim=None,
                  norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1),
    "sr3": dict(block_out_channels=(128, 256, 512, 1024, 1024), down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D",),
                up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 4, layers_per_block=2, attention_head_dim=None),
}


def build(preset: str, size: int, device):
    from diffusers import UNet2DModel

    with torch.device(device):
        return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, **PRESETS[preset])


def train_flops(preset: str, batch: int, size: int) -> int:
    """FLOPs of one training iteration (forward + backward of the epsilon loss)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = build(preset, size, "meta")
    x = torch.randn(batch, 3, size, size, device="meta")
    t = torch.randint(0, 1000, (batch,), device="meta")
    with FlopCounterMode(display=False) as fc:
        loss = F.mse_loss(net(x, t).sample, x)
        loss.backward()
    return int(fc.get_total_flops())


def forward_flops(preset: str, size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    net = build(preset, size, "meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.randn(1, 3, size, size, device="meta"), torch.tensor([10], device="meta"))
    return int(fc.get_total_flops())


def matmul_peak_tflops(n: int = 8192, reps: int = 50) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def gpu_throughput(preset: str, batch: int, size: int, iters: int) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    net = build(preset, size, "cuda")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    x = torch.randn(batch, 3, size, size, device="cuda")

    def step():
        t = torch.randint(0, 1000, (batch,), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.mse_loss(net(x, t).sample.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    return {"seconds_per_iteration": dt, "images_per_s": batch / dt, "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["ho256", "sr3"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    out = {"batch": args.batch, "size": args.size, "presets": {}}
    cuda = torch.cuda.is_available()
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(0)
        out["bf16_matmul_peak_tflops"] = matmul_peak_tflops()
    for p in args.presets:
        r = {"train_flops_per_iteration": train_flops(p, args.batch, args.size), "forward_flops_per_image": forward_flops(p, args.size)}
        if cuda:
            r.update(gpu_throughput(p, args.batch, args.size, args.iters))
            r["fraction_of_peak"] = r["train_flops_per_iteration"] / r["seconds_per_iteration"] / 1e12 / out["bf16_matmul_peak_tflops"]
        out["presets"][p] = r
    print(json.dumps(out))


if __name__ == "__main__":
    main()
