"""The DDPM objective for the shared trainer: a diffusers UNet2DModel + DDPMScheduler ->
epsilon-prediction loss.

Maths (paper eq. 3-5): for x_0 in [-1, 1], t ~ U{0..T-1}, eps ~ N(0, I),
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (float32) and L = || eps_theta(x_t, c_t) - eps ||^2,
where the network's conditioning c_t is t itself or (SR3 / DDPM-CD) the continuous noise level
sqrt(abar) (`noise.ForwardProcess`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rsseg.config.specs import OptimSpec
from rsseg.methods.ddpm.noise import ForwardProcess, build_scheduler
from rsseg.methods.ddpm.spec import NoiseScheduleSpec
from rsseg.methods.ddpm.unet import build_unet, conditioning_of, jsonable

PAPER_TIMESTEPS = (50, 100, 150, 200)


class DdpmObjective:
    name = "ddpm"

    def __init__(self, unet: dict[str, Any], schedule: NoiseScheduleSpec, optim: OptimSpec):
        self.unet_config = unet
        self.schedule = schedule
        self.optim = optim
        self.network = build_unet(unet)
        self.process = ForwardProcess(schedule, conditioning_of(unet))

    def loss(self, net: torch.nn.Module, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        xt, cond, noise = self.process.training_draw(images, generator)
        pred = net(xt.to(images.dtype), cond).sample
        return F.mse_loss(pred.float(), noise), {}

    def describe(self) -> dict[str, Any]:
        return {"kind": "ddpm", "unet": jsonable(self.unet_config), "schedule": self.schedule.model_dump(mode="json")}

    @torch.no_grad()
    def artifacts(self, net: torch.nn.Module, images: torch.Tensor, generator: torch.Generator, out_dir: Path, *,
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
                noise = torch.randn(x0.shape, generator=generator).to(device)
                xt, cond = self.process.noised(x0, noise, torch.tensor([t], device=device))
                eps = net(xt, cond).sample.float()
                g = self.process.signal(t)
                x0_hat = (xt - (1 - g * g) ** 0.5 * eps) / g
                row += [xt, x0_hat.clamp(-1, 1)]
            rows.append(torch.cat(row))
        cols = ["x0"] + [f"{k} t={t}" for t in PAPER_TIMESTEPS for k in ("x_t", "x0-hat")]
        paths = [save_grid(rows, out_dir / "denoising.png", cols)]
        if samples:
            sched = build_scheduler(self.schedule)
            sched.set_timesteps(min(sample_steps, self.schedule.train_steps))
            x = torch.randn((samples, *images.shape[1:]), generator=generator).to(device)
            for t in sched.timesteps:
                eps = net(x, self.process.step_conditioning(t.to(device))).sample.float()
                x = sched.step(eps, t, x, generator=generator).prev_sample
            paths.append(save_grid([x.clamp(-1, 1)], out_dir / "samples.png", [f"sample {i}" for i in range(samples)]))
        net.train()
        return paths


def build_objective(run, in_channels: int) -> DdpmObjective:
    """The run's UNet (the preset's, or the network of the imported weights ``pretrain.init``
    starts from) on the run's own schedule."""
    from rsseg.methods.ddpm.rules import network

    return DdpmObjective(network(run, in_channels), run.ddpm.schedule, run.ddpm.optim)
