"""The compared methods of Table 3, registered through the ``rsseg.methods`` entry-point group
(pyproject.toml) exactly as a user's own method would be: nothing in platform/ names them."""

from __future__ import annotations

from rsseg.methods import Method
from rsseg_baselines.convnext import ConvNextSpec
from rsseg_baselines.vit import MaeSpec, ScaleMaeSpec

_MAE_KEYS = ("size", "mask_ratio", "norm_pix_loss", "optim")

CONVNEXT_RANDOM = Method(
    name="convnext_random",
    summary="ConvNeXt-B (transformers), random init, + UPerNet; no pre-training",
    block="convnext", spec=ConvNextSpec,
    encoder="rsseg_baselines.convnext:build_random",
    heads=("upernet", "upernet"),
    tags="rsseg_baselines.convnext:tags",
    paper_row="Random-init (ConvNeXt-B)",
)
CONVNEXT_IMAGENET = Method(
    name="convnext_imagenet",
    summary="ConvNeXt-B (transformers), ImageNet weights from a local file (convnext.weights), + UPerNet",
    block="convnext", spec=ConvNextSpec,
    encoder="rsseg_baselines.convnext:build_imagenet",
    heads=("upernet", "upernet"),
    tags="rsseg_baselines.convnext:tags",
    checks="rsseg_baselines.convnext:check_imagenet",
    paper_row="IN-init (ConvNeXt-B)",
)
MAE = Method(
    name="mae",
    summary="MAE ViT (transformers ViTMAE) pre-trained by the platform on the unlabelled tiles; blocks 3/5/7/11 -> 4-scale neck",
    block="mae", spec=MaeSpec,
    objective="rsseg_baselines.vit:build_mae_objective",
    pretrain_keys=_MAE_KEYS,
    encoder="rsseg_baselines.vit:build_encoder",
    neck="rsseg_baselines.vit:build_neck",
    heads=("mlp", "upernet"),
    tags="rsseg_baselines.vit:mae_tags",
    paper_row="MAE",
)
SCALEMAE = Method(
    name="scalemae",
    summary="ScaleMAE: MAE + GSD-scaled sin-cos positions + two-band (Laplacian) reconstruction loss",
    block="scalemae", spec=ScaleMaeSpec,
    objective="rsseg_baselines.vit:build_scalemae_objective",
    pretrain_keys=_MAE_KEYS + ("gsd", "reference_gsd"),
    encoder="rsseg_baselines.vit:build_encoder",
    neck="rsseg_baselines.vit:build_neck",
    heads=("mlp", "upernet"),
    tags="rsseg_baselines.vit:mae_tags",
    paper_row="ScaleMAE",
)
