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


METHOD = Method(
    name="ddpm",
    summary="DDPM pre-trained UNet (diffusers), multi-timestep decoder features (ours in the paper)",
    block="ddpm",
    spec=DdpmSpec,
    objective="rsseg.pretrain.ddpm:build_objective",
    encoder="rsseg.encoders.ddpm:build_encoder",
    heads=("mlp", "mlp"),
    tags="rsseg.methods.ddpm:tags",
    paper_row="ours",
)
