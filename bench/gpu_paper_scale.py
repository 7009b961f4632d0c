"""GPU check of the paper's scale: needs only torch + diffusers (no rsseg install), < 5 minutes.

    python bench/gpu_paper_scale.py                # on a CUDA machine: the figures for docs/benchmarks.md
    python bench/gpu_paper_scale.py --smoke        # tiny sizes on the CPU: checks that the script runs

Measures, printing one JSON object (and a Markdown table):
- the device's bf16 matmul peak (TFLOP/s, best of square matmuls);
- DDPM pre-training of the paper's SR3 UNet (DDPM-CD: base 64, (1, 2, 4, 8, 8), noise-level
  conditioning, 64 -> 256 -> 64 MLP) at 256^2, batch 8 / 16 / 32, bf16 autocast: images/s, the
  fraction of the peak (FLOPs of one step from torch's FLOP counter) and peak memory;
- frozen feature extraction at t = {50, 100, 150} in one batched forward: the early-exit forward
  that stops after the 1/2 decoder level vs the full network, tiles/s and fraction of the peak;
- the MLP segmentor (one map x 3 timesteps per resolution, fusion 1024 wide: the paper's 16.3 M)
  trained on frozen features: iterations/s at batch 8.
Targets (reported, not asserted): pre-training >= 35 % of the measured peak, extraction >= 40 %.

The UNet config and the extractor's forward are copies of rsseg's (methods/ddpm/unet.py and
encoder.py) so this file has no rsseg import: GPU boxes have torch and a diffusers wheel only.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

SR3 = dict(block_out_channels=(64, 128, 256, 512, 512), down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D",),
           up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 4, layers_per_block=2, attention_head_dim=None, dropout=0.2,
           norm_num_groups=32, flip_sin_to_cos=False, freq_shift=0, time_embedding_dim=64)
TINY = dict(SR3, block_out_channels=(32, 32, 64, 64, 64), time_embedding_dim=32)


def build_sr3(cfg: dict, size: int, device) -> nn.Module:
    from diffusers import UNet2DModel
    from diffusers.models.embeddings import TimestepEmbedding
    from diffusers.models.resnet import ResnetBlock2D

    with torch.device(device):
        net = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, **cfg)
        inner = cfg["block_out_channels"][0]
        net.time_embedding = TimestepEmbedding(inner, 4 * inner, out_dim=cfg["time_embedding_dim"])
    for m in net.modules():
        if isinstance(m, ResnetBlock2D):
            m.skip_time_act = True
    return net


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, reps: int) -> float:
    """Seconds per call (after warm-up)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device, n: int) -> float:
    """bf16 TFLOP/s of the best square matmul size up to n."""
    best = 0.0
    for size in (n // 2, n):
        a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        s = timed(lambda: a @ b, device, 3, 10)
        best = max(best, 2 * size**3 / s / 1e12)
    return best


def peak_memory(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def pretrain(cfg, size: int, batch: int, device, reps: int) -> dict:
    reset_memory(device)
    net = build_sr3(cfg, size, device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    x0 = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    g = torch.rand(batch, device=device)  # noise levels sqrt(abar)
    noise = torch.randn_like(x0)

    def step():
        xt = g.view(-1, 1, 1, 1) * x0 + (1 - g.view(-1, 1, 1, 1) ** 2).sqrt() * noise
        with autocast(device):
            loss = F.mse_loss(net(xt, g).sample.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    flops = flops_of(step)
    s = timed(step, device, 2, reps)
    out = {"batch": batch, "images_per_s": batch / s, "tflops": flops / s / 1e12, "gflop_per_step": flops / 1e9,
           "peak_memory_gib": peak_memory(device)}
    del net, opt
    return out


def early_exit_forward(unet, sample, cond, last_level: int):
    """rsseg's extractor forward (copy): decoder maps down to up block ``last_level``, then stop."""
    emb = unet.time_embedding(unet.time_proj(cond).to(sample.dtype))
    h = unet.conv_in(sample)
    res = (h,)
    for down in unet.down_blocks:
        h, r = down(hidden_states=h, temb=emb)
        res += r
    h = unet.mid_block(h, emb)
    maps = []
    for i, up in enumerate(unet.up_blocks):
        skips = res[-len(up.resnets):]
        res = res[: -len(up.resnets)]
        attentions = getattr(up, "attentions", None)
        for j, resnet in enumerate(up.resnets):
            skip, skips = skips[-1], skips[:-1]
            h = resnet(torch.cat([h, skip], dim=1), emb)
            if attentions is not None:
                h = attentions[j](h)
        maps.append(h)  # the level's last map (the 16.3 M reading)
        if i == last_level:
            return maps
        for upsampler in up.upsamplers or []:
            h = upsampler(h)
    return maps


def extraction(cfg, size: int, batch: int, device, reps: int) -> dict:
    reset_memory(device)
    net = build_sr3(cfg, size, device).eval().requires_grad_(False)
    timesteps = 3
    x = torch.rand(batch * timesteps, 3, size, size, device=device)
    cond = torch.rand(batch * timesteps, device=device)
    out = {}
    for name, fn in (("early_exit", lambda: early_exit_forward(net, x, cond, last_level=3)), ("full", lambda: net(x, cond).sample)):
        def run(fn=fn):
            with torch.no_grad(), autocast(device):
                fn()

        flops = flops_of(run)
        s = timed(run, device, 2, reps)
        out[name] = {"tiles_per_s": batch / s, "tflops": flops / s / 1e12, "gflop_per_tile": flops / batch / 1e9}
    out["peak_memory_gib"] = peak_memory(device)
    return out


class MlpBlock(nn.Module):  # rsseg.heads.mlp.MlpBlock (copy)
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear1, self.bn1 = nn.Conv2d(c_in, c_in, 1), nn.BatchNorm2d(c_in)
        self.linear2, self.bn2 = nn.Conv2d(c_in, c_in, 1), nn.BatchNorm2d(c_in)
        self.linear3 = nn.Conv2d(c_in, c_out, 1)

    def forward(self, f):
        z1 = F.relu(self.bn1(self.linear1(f) + f))
        z2 = F.relu(self.bn2(self.linear2(z1) + z1))
        return self.linear3(z2)


def head_training(channels: tuple[int, ...], size: int, batch: int, device, reps: int, classes: int = 12) -> dict:
    reset_memory(device)
    strides = (16, 8, 4, 2)
    blocks = nn.ModuleList([MlpBlock(3 * c, c) for c in channels]).to(device)
    proj = nn.Conv2d(sum(channels), 1024, 1).to(device)
    final = MlpBlock(1024, classes).to(device)
    params = sum(p.numel() for m in (blocks, proj, final) for p in m.parameters())
    feats = [torch.randn(batch, 3 * c, size // s, size // s, device=device) for c, s in zip(channels, strides)]
    mask = torch.randint(0, classes, (batch, size, size), device=device)
    opt = torch.optim.AdamW([p for m in (blocks, proj, final) for p in m.parameters()], lr=2e-4)

    def step():
        with autocast(device):
            outs = [F.interpolate(b(f), size=(size // 4, size // 4), mode="bilinear") for b, f in zip(blocks, feats)]
            logits = F.interpolate(final(proj(torch.cat(outs, 1))), size=(size, size), mode="bilinear")
            loss = F.cross_entropy(logits.float(), mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    s = timed(step, device, 2, reps)
    return {"batch": batch, "iterations_per_s": 1 / s, "head_params_M": params / 1e6, "peak_memory_gib": peak_memory(device)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cfg, size, batches, reps, n = (TINY, 64, (2,), 1, 256) if args.smoke else (SR3, 256, (8, 16, 32), 5, 8192)
    t0 = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "peak_bf16_tflops": matmul_peak(device, n)}
    import diffusers

    result["diffusers"] = diffusers.__version__
    with torch.device("meta"):
        result["sr3_params_M"] = sum(p.numel() for p in build_sr3(SR3, 256, "meta").parameters()) / 1e6
    result["pretrain"] = [pretrain(cfg, size, b, device, reps) for b in batches]
    result["extraction"] = extraction(cfg, size, batches[0], device, reps)
    # the last decoder map of each level at 1/16, 1/8, 1/4, 1/2 (levels 4, 3, 2, 1)
    levels = cfg["block_out_channels"]
    result["head"] = head_training((levels[4], levels[3], levels[2], levels[1]), size, 8 if not args.smoke else 2, device, reps)
    peak = result["peak_bf16_tflops"]
    for p in result["pretrain"]:
        p["fraction_of_peak"] = p["tflops"] / peak
    for k in ("early_exit", "full"):
        result["extraction"][k]["fraction_of_peak"] = result["extraction"][k]["tflops"] / peak
    best = max(p["fraction_of_peak"] for p in result["pretrain"])
    result["targets"] = {"pretrain >= 0.35 of peak": best >= 0.35,
                         "extraction (early exit) >= 0.40 of peak": result["extraction"]["early_exit"]["fraction_of_peak"] >= 0.40}
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result, indent=1))
    print(f"\n| measure | value |\n|---|---:|\n| device | {result['device']} |\n| bf16 matmul peak | {peak:.1f} TFLOP/s |")
    for p in result["pretrain"]:
        print(f"| pre-training sr3 256², batch {p['batch']} | {p['images_per_s']:.1f} img/s, {100 * p['fraction_of_peak']:.0f} % of peak, "
              f"{p['peak_memory_gib'] or 0:.1f} GiB |")
    for k in ("early_exit", "full"):
        e = result["extraction"][k]
        print(f"| extraction t = 50/100/150, {k} | {e['tiles_per_s']:.1f} tiles/s, {100 * e['fraction_of_peak']:.0f} % of peak |")
    h = result["head"]
    print(f"| MLP segmentor ({h['head_params_M']:.1f} M) training, batch {h['batch']} | {h['iterations_per_s']:.1f} it/s |")


if __name__ == "__main__":
    main()
