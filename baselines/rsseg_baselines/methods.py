"""The compared methods of Table 3, registered through the ``rsseg.methods`` entry-point group
(pyproject.toml) exactly as a user's own method would be: nothing in platform/ names them."""

from __future__ import annotations

from dataclasses import replace

from rsseg.methods import Method
from rsseg_baselines.convnext import ConvNextSpec
from rsseg_baselines.ma3e import Ma3eSpec
from rsseg_baselines.segformer import SegformerSpec
from rsseg_baselines.vit import MaeSpec, ScaleMaeSpec

CONVNEXT_RANDOM = Method(
    name="convnext_random",
    summary="ConvNeXt-B (transformers), random init, + UPerNet; no pre-training",
    label="Random-init (ConvNeXt-B)",
    block="convnext", spec=ConvNextSpec,
    encoder="rsseg_baselines.convnext:build_random", skeleton="rsseg_baselines.convnext:skeleton",
    heads=("upernet", "upernet"),
    tags="rsseg_baselines.convnext:tags", tag_keys=("backbone", "weights"),
    imports=("transformers.models.convnext.modeling_convnext", "transformers.models.upernet.modeling_upernet"),
)
CONVNEXT_IMAGENET = replace(
    CONVNEXT_RANDOM,
    name="convnext_imagenet",
    summary="ConvNeXt-B (transformers), ImageNet weights from a local file (convnext.weights), + UPerNet",
    label="IN-init (ConvNeXt-B)",
    encoder="rsseg_baselines.convnext:build_imagenet",
    checks="rsseg_baselines.convnext:check_imagenet",
    unavailable="rsseg_baselines.convnext:imagenet_unavailable",
    preflight="rsseg_baselines.convnext:preflight_imagenet",
)
MAE = Method(
    name="mae",
    summary="MAE ViT (transformers ViTMAE) pre-trained by the platform on the unlabelled tiles, or public weights (mae.weights); "
            "blocks 3/5/7/11 -> 4-scale neck",
    label="MAE",
    block="mae", spec=MaeSpec,
    objective="rsseg_baselines.vit:build_mae_objective",
    pretrain_keys=("size", "mask_ratio", "norm_pix_loss", "optim"),
    encoder="rsseg_baselines.vit:build_encoder", skeleton="rsseg_baselines.vit:skeleton",
    neck="rsseg_baselines.vit:build_neck",
    heads=("mlp", "upernet"),
    tags="rsseg_baselines.vit:mae_tags", tag_keys=("backbone", "blocks", "weights"),
    # mae.weights: NAME reads public weights (imported once) instead of pre-training here
    needs_pretraining_fn="rsseg_baselines.vit:needs_pretraining",
    unavailable="rsseg_baselines.vit:public_weights_unavailable",
    importers=(("vitmae", "rsseg_baselines.vit:import_vitmae"),),
    imports=("transformers.models.vit_mae.modeling_vit_mae",),
)
SCALEMAE = replace(
    MAE,
    name="scalemae",
    summary="ScaleMAE: MAE + GSD-scaled sin-cos positions + two-band (Laplacian) reconstruction loss",
    label="ScaleMAE",
    block="scalemae", spec=ScaleMaeSpec,
    objective="rsseg_baselines.vit:build_scalemae_objective",
    pretrain_keys=MAE.pretrain_keys + ("gsd", "reference_gsd"),
    importers=(("scalemae", "rsseg_baselines.vit:import_scalemae"),),  # the release .pth (ViT-L/16, timm keys)
)
MA3E = replace(
    MAE,
    name="ma3e",
    summary="MA3E: MAE with one randomly rotated crop per tile, an angle embedding on its tokens and an optimal-transport "
            "loss over it (Sinkhorn); pre-trained by the platform",
    label="MA3E",
    block="ma3e", spec=Ma3eSpec,
    objective="rsseg_baselines.ma3e:build_objective",
    pretrain_keys=MAE.pretrain_keys + ("window", "angle_range", "window_mask_ratio", "sinkhorn_eps", "sinkhorn_iterations"),
    checks="rsseg_baselines.ma3e:check",
    needs_pretraining_fn=None, unavailable=None, importers=(),  # no importer for its release (yet): always pre-trained here
)
SEGFORMER = Method(
    name="segformer",
    summary="SegFormer (transformers MiT-B4 + all-MLP decoder), random init or local ImageNet MiT weights (segformer.weights); fine-tuned",
    label="SegFormer-B4 (run here)",
    block="segformer", spec=SegformerSpec,
    encoder="rsseg_baselines.segformer:build", skeleton="rsseg_baselines.segformer:skeleton",
    checks="rsseg_baselines.segformer:check",
    heads=("segformer", "segformer"),
    tags="rsseg_baselines.segformer:tags", tag_keys=("backbone", "weights"),
    imports=("transformers.models.segformer.modeling_segformer",),
)
