"""The noise schedule (diffusers' ``DDPMScheduler``) and the forward process, for both ways a
UNet can be told how noisy its input is.

x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, computed in float32: diffusers casts its abar
table to the sample's dtype, and in bf16 sqrt(abar_t) for small t rounds to 1. t = 0 is the
clean image by the paper's convention.

- ``timestep`` conditioning (diffusers / Ho et al.): the network gets the step index t;
  sqrt(abar) is diffusers' ``alphas_cumprod[t]``.
- ``noise_level`` conditioning (SR3 / DDPM-CD, the paper's network): the network gets the
  continuous noise level g = sqrt(abar) itself. DDPM-CD indexes it as
  ``sqrt_alphas_cumprod_prev[t] = sqrt(prod_{s < t} (1 - beta_s))`` (1 at t = 0), and trains on
  a level drawn uniformly between those of t - 1 and t for t ~ U{1..T}.

Timestep numbers mean different noise amounts under different schedules and conventions, so runs
log sqrt(abar_t) too (`ForwardProcess.signal`).
"""

from __future__ import annotations

import torch

from rsseg.methods.ddpm.spec import NoiseScheduleSpec

CONDITIONINGS = ("timestep", "noise_level")


def max_feature_timestep(train_steps: int, conditioning: str) -> int:
    """The largest t a feature timestep may name: T - 1 for a timestep-conditioned UNet, T for an
    SR3 one (DDPM-CD's t indexes sqrt_alphas_cumprod_prev, 0..T). The one place of this rule."""
    return train_steps - 1 if conditioning == "timestep" else train_steps


def timesteps_outside(timesteps, train_steps: int, conditioning: str) -> str | None:
    """Why these feature timesteps do not fit the schedule ("<t> is outside the schedule's 0..<last>"), or None."""
    last = max_feature_timestep(train_steps, conditioning)
    bad = [t for t in timesteps if t > last]
    return f"{bad[0]} is outside the schedule's 0..{last}" if bad else None


def build_scheduler(spec: NoiseScheduleSpec):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=spec.train_steps,
        beta_schedule="linear" if spec.kind == "linear" else "squaredcos_cap_v2",
        beta_start=spec.beta_start,
        beta_end=spec.beta_end,
    )


def schedules_match(theirs: dict, ours: NoiseScheduleSpec) -> bool:
    """Whether a stored schedule (a checkpoint's, imported weights') is ``ours`` (betas to 1e-6)."""
    import math

    t = NoiseScheduleSpec(**{k: v for k, v in theirs.items() if k != "preset"})
    return (t.kind == ours.kind and t.train_steps == ours.train_steps and math.isclose(t.beta_start, ours.beta_start, rel_tol=1e-6)
            and math.isclose(t.beta_end, ours.beta_end, rel_tol=1e-6))


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t in float32 at diffusers index t (t == 0 rows are *not* special here)."""
    return scheduler.add_noise(x0.float(), noise.float(), t.to(x0.device))


class ForwardProcess:
    """The schedule + how the network is conditioned: noising, conditioning values, sampling."""

    def __init__(self, spec: NoiseScheduleSpec, conditioning: str = "timestep"):
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r}; expected one of {', '.join(CONDITIONINGS)}")
        self.spec = spec
        self.conditioning = conditioning
        with torch.device("cpu"):  # the tables live on the host, even when a network is built on meta
            self.scheduler = build_scheduler(spec)
            abar = self.scheduler.alphas_cumprod.double()
            # (T + 1,) DDPM-CD's table: index t -> sqrt(abar of step t - 1), 1 at t = 0
            self.sqrt_abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar]).sqrt()

    @property
    def max_timestep(self) -> int:
        """The largest t a feature timestep may name."""
        return max_feature_timestep(self.spec.train_steps, self.conditioning)

    def signal(self, t: int) -> float:
        """sqrt(abar_t): how much of x_0 survives at timestep t (1.0 at t = 0)."""
        if t == 0:
            return 1.0
        if self.conditioning == "timestep":
            return float(self.scheduler.alphas_cumprod[t].sqrt())
        return float(self.sqrt_abar_prev[t])

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t in float32, the network's conditioning input) for integer timesteps t (B,)."""
        if self.conditioning == "timestep":
            return add_noise(self.scheduler, x0, noise, t), t
        g = self.sqrt_abar_prev.to(x0.device)[t.to(x0.device)].float()
        return self.at_level(x0, noise, g), g

    @staticmethod
    def at_level(x0: torch.Tensor, noise: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """x = g x_0 + sqrt(1 - g^2) eps for per-sample noise levels g (B,), float32."""
        g = g.float().view(-1, *([1] * (x0.dim() - 1)))
        return g * x0.float() + (1 - g * g).sqrt() * noise.float()

    def training_draw(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, conditioning, eps) of one training batch, all drawn from ``generator``: t ~ U{0..T-1}
        (timestep), or SR3's continuous level g ~ U(sqrt_abar_prev[t], sqrt_abar_prev[t - 1]) for
        t ~ U{1..T} (noise level); eps ~ N(0, I)."""
        b, T = x0.shape[0], self.spec.train_steps
        if self.conditioning == "timestep":
            t = torch.randint(0, T, (b,), generator=generator).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            return add_noise(self.scheduler, x0, noise, t), t, noise
        t = torch.randint(1, T + 1, (b,), generator=generator)
        hi, lo = self.sqrt_abar_prev[t - 1], self.sqrt_abar_prev[t]
        g = (lo + (hi - lo) * torch.rand(b, generator=generator, dtype=torch.float64)).float().to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        return self.at_level(x0, noise, g), g, noise

    def step_conditioning(self, t: torch.Tensor) -> torch.Tensor:
        """The conditioning input at diffusers' reverse-process step index t (sampling)."""
        if self.conditioning == "timestep":
            return t
        return self.scheduler.alphas_cumprod.to(t.device)[t].sqrt().float()
