"""The paper's method as a self-contained package: DDPM pre-training of a diffusers UNet, frozen
multi-timestep decoder features, the MLP segmentor.

    spec.py       the ``ddpm:`` block of a run spec (UNet, schedule, optimiser, features)
    rules.py      what a run needs from its spec: its network, tags, checks, availability (the hooks)
    unet.py       UNet presets (tiny, ho256, sr3), torch-free
    noise.py      the noise schedule and the forward process
    objective.py  the pre-training objective for the shared trainer
    encoder.py    the feature extractor (encoder contract)
    weights.py    loading weights with an asserted key set

It registers through the ``rsseg.methods`` entry point (pyproject.toml) like every baseline.
"""

from __future__ import annotations

from rsseg.methods import Method
from rsseg.methods.ddpm import encoder, objective, rules, weights
from rsseg.methods.ddpm.spec import DdpmSpec

METHOD = Method(
    name="ddpm",
    summary="DDPM pre-trained UNet (diffusers), multi-timestep decoder features (ours in the paper)",
    label="ours (DDPM)",
    block="ddpm",
    spec=DdpmSpec,
    objective=objective.build_objective,
    pretrain_keys=("unet", "schedule", "optim"),
    encoder=encoder.build_encoder,
    skeleton=encoder.skeleton,
    importers=(("diffusers", weights.import_diffusers), ("ddpm-cd", weights.import_ddpm_cd)),
    heads=("mlp", "mlp"),
    tags=rules.tags,
    tag_keys=("timesteps", "side", "resolutions", "unet", "noise", "sqrt_abar", "weights", "pretrain_init"),
    checks=rules.checks,
    needs_pretraining_fn=rules.needs_pretraining,
    unavailable=rules.unavailable,
    preflight=rules.preflight,
    imports=("diffusers.models.unets.unet_2d",),
)
