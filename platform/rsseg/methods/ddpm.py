"""The paper's method: DDPM pre-training, frozen decoder features, the MLP segmentor."""

from __future__ import annotations

from rsseg.config.specs import DdpmSpec
from rsseg.methods import Method


def tags(run) -> dict[str, object]:
    f = run.ddpm.features
    return {
        "timesteps": ",".join(str(t) for t in f.timesteps),
        "side": f.side,
        "resolutions": ",".join(str(r) for r in f.resolutions),
        "unet": run.ddpm.unet.preset,
        "noise": f.noise,
    }


def checks(run) -> list[tuple[str, str]]:
    problems = []
    warmup, total = run.ddpm.optim.warmup_iterations, run.pretrain.iterations.n_total
    if warmup > total:
        problems.append(("ddpm.optim.warmup_iterations",
                         f"warm-up of {warmup} iterations is longer than the whole pre-training ({total} iterations, pretrain.iterations)"))
    f = run.ddpm.features
    if f.timesteps and max(f.timesteps) >= run.ddpm.schedule.train_steps:
        problems.append(("ddpm.features.timesteps",
                         f"timestep {max(f.timesteps)} is outside the schedule's 0..{run.ddpm.schedule.train_steps - 1}"))
    return problems


def needs_pretraining(run) -> bool:
    return run.ddpm.features.weights != "random"


METHOD = Method(
    name="ddpm",
    summary="DDPM pre-trained UNet (diffusers), multi-timestep decoder features (ours in the paper)",
    block="ddpm",
    spec=DdpmSpec,
    objective="rsseg.pretrain.ddpm:build_objective",
    pretrain_keys=("unet", "schedule", "optim"),
    encoder="rsseg.encoders.ddpm:build_encoder",
    heads=("mlp", "mlp"),
    tags="rsseg.methods.ddpm:tags",
    checks="rsseg.methods.ddpm:checks",
    needs_pretraining_fn="rsseg.methods.ddpm:needs_pretraining",
    paper_row="ours",
)
