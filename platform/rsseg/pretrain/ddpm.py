"""The DDPM objective: a diffusers UNet2DModel + DDPMScheduler -> epsilon-prediction loss.

Maths (paper eq. 3-5): for x_0 in [-1, 1], t ~ U{0..T-1}, eps ~ N(0, I),
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps and L = || eps_theta(x_t, t) - eps ||^2.
``add_noise`` is computed in float32: diffusers casts its abar table to the sample's dtype, and
in bf16 sqrt(abar_t) for small t rounds to 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rsseg.config.specs import NoiseScheduleSpec, OptimSpec
from rsseg.pretrain.unet import build_unet, unet_config

PAPER_TIMESTEPS = (50, 100, 150, 200)


def build_scheduler(spec: NoiseScheduleSpec):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=spec.train_steps,
        beta_schedule="linear" if spec.kind == "linear" else "squaredcos_cap_v2",
        beta_start=spec.beta_start,
        beta_end=spec.beta_end,
    )


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t in float32; t == 0 rows are *not* special here (diffusers' t=0 is one noise step)."""
    return scheduler.add_noise(x0.float(), noise.float(), t.to(x0.device))


def signal_scale(scheduler, t: int) -> float:
    """sqrt(abar_t): how much of x_0 survives at timestep t (log it: t means different noise
    amounts under different schedules). t = 0 is the clean image (1.0) by the paper's convention."""
    if t == 0:
        return 1.0
    return float(scheduler.alphas_cumprod[t].sqrt())


class DdpmObjective:
    name = "ddpm"

    def __init__(self, unet: dict[str, Any], schedule: NoiseScheduleSpec, optim: OptimSpec):
        self.unet_config = unet
        self.schedule = schedule
        self.optim = optim
        self.network = build_unet_from_config(unet)
        self.scheduler = build_scheduler(schedule)

    def loss(self, net: torch.nn.Module, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        b = images.shape[0]
        t = torch.randint(0, self.schedule.train_steps, (b,), generator=generator).to(images.device)
        noise = torch.randn(images.shape, generator=generator).to(images.device)
        xt = add_noise(self.scheduler, images, noise, t)
        pred = net(xt.to(images.dtype), t).sample
        return F.mse_loss(pred.float(), noise), {}

    def describe(self) -> dict[str, Any]:
        return {"kind": "ddpm", "unet": _jsonable(self.unet_config), "schedule": self.schedule.model_dump(mode="json")}

    @torch.no_grad()
    def artifacts(self, net: torch.nn.Module, images: torch.Tensor, generator: torch.Generator, out_dir: Path,
                  samples: int = 4, sample_steps: int = 50) -> list[Path]:
        """Two PNGs: x_t and the one-step denoised x_0 estimate at the paper's timesteps for real
        tiles, and a few images generated from pure noise with a strided reverse process."""
        from rsseg.viz import save_grid

        net.eval()
        device = images.device
        rows = []
        for x0 in images[:4]:
            x0 = x0[None]
            row = [x0]
            for t in PAPER_TIMESTEPS:
                tt = torch.tensor([t], device=device)
                noise = torch.randn(x0.shape, generator=generator).to(device)
                xt = add_noise(self.scheduler, x0, noise, tt)
                eps = net(xt, tt).sample.float()
                abar = self.scheduler.alphas_cumprod[t].to(device)
                x0_hat = (xt - (1 - abar).sqrt() * eps) / abar.sqrt()
                row += [xt, x0_hat.clamp(-1, 1)]
            rows.append(torch.cat(row))
        cols = ["x0"] + [f"{k} t={t}" for t in PAPER_TIMESTEPS for k in ("x_t", "x0-hat")]
        paths = [save_grid(rows, out_dir / "denoising.png", cols)]
        if samples:
            sched = build_scheduler(self.schedule)
            sched.set_timesteps(min(sample_steps, self.schedule.train_steps))
            x = torch.randn((samples, *images.shape[1:]), generator=generator).to(device)
            for t in sched.timesteps:
                eps = net(x, t.to(device)).sample.float()
                x = sched.step(eps, t, x, generator=generator).prev_sample
            paths.append(save_grid([x.clamp(-1, 1)], out_dir / "samples.png", [f"sample {i}" for i in range(samples)]))
        net.train()
        return paths


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def build_unet_from_config(cfg: dict[str, Any]):
    from diffusers import UNet2DModel

    return UNet2DModel(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


def build_objective(run, in_channels: int) -> DdpmObjective:
    spec = run.ddpm
    cfg = unet_config(spec.unet.preset, spec.unet.overrides, in_channels=in_channels, sample_size=run.data.tile_size)
    return DdpmObjective(cfg, spec.schedule, spec.optim)


def count_parameters(preset: str, in_channels: int = 3) -> int:
    net = build_unet(preset, in_channels=in_channels)
    return sum(p.numel() for p in net.parameters())
