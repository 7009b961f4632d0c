"""The compared methods of Table 3, registered through the ``rsseg.methods`` entry-point group
(pyproject.toml) exactly as a user's own method would be: nothing in platform/ names them."""

from __future__ import annotations

from dataclasses import replace

from rsseg.methods import Method
from rsseg_baselines.convnext import encoder as convnext_encoder, rules as convnext_rules
from rsseg_baselines.convnext.spec import ConvNextSpec
from rsseg_baselines.ma3e import objective as ma3e_objective, rules as ma3e_rules
from rsseg_baselines.ma3e.spec import Ma3eSpec
from rsseg_baselines.segformer import encoder as segformer_encoder, rules as segformer_rules
from rsseg_baselines.segformer.spec import SegformerSpec
from rsseg_baselines.vit import encoder as vit_encoder, objective as vit_objective, rules as vit_rules, weights as vit_weights
from rsseg_baselines.vit.spec import MaeSpec, ScaleMaeSpec

CONVNEXT_RANDOM = Method(
    name="convnext_random",
    summary="ConvNeXt-B (transformers), random init, + UPerNet; no pre-training",
    label="Random-init (ConvNeXt-B)",
    block="convnext", spec=ConvNextSpec,
    encoder=convnext_encoder.build_random, skeleton=convnext_encoder.skeleton,
    heads=("upernet", "upernet"),
    tags=convnext_rules.tags, tag_keys=("backbone", "weights"),
    imports=("transformers.models.convnext.modeling_convnext", "transformers.models.upernet.modeling_upernet"),
)
CONVNEXT_IMAGENET = replace(
    CONVNEXT_RANDOM,
    name="convnext_imagenet",
    summary="ConvNeXt-B (transformers), ImageNet weights from a local file (convnext.weights), + UPerNet",
    label="IN-init (ConvNeXt-B)",
    encoder=convnext_encoder.build_imagenet,
    checks=convnext_rules.check_imagenet,
    unavailable=convnext_rules.imagenet_unavailable,
    preflight=convnext_rules.preflight_imagenet,
)
MAE = Method(
    name="mae",
    summary="MAE ViT (transformers ViTMAE) pre-trained by the platform on the unlabelled tiles, or public weights (mae.weights); "
            "blocks 3/5/7/11 -> 4-scale neck",
    label="MAE",
    block="mae", spec=MaeSpec,
    objective=vit_objective.build_mae_objective,
    pretrain_keys=("size", "mask_ratio", "norm_pix_loss", "optim"),
    encoder=vit_encoder.build_encoder, skeleton=vit_encoder.skeleton,
    neck=vit_encoder.build_neck,
    heads=("mlp", "upernet"),
    tags=vit_rules.mae_tags, tag_keys=("backbone", "blocks", "weights"),
    # mae.weights: NAME reads public weights (imported once) instead of pre-training here
    needs_pretraining_fn=vit_rules.needs_pretraining,
    unavailable=vit_rules.public_weights_unavailable,
    importers=(("vitmae", vit_weights.import_vitmae),),
    imports=("transformers.models.vit_mae.modeling_vit_mae",),
)
SCALEMAE = replace(
    MAE,
    name="scalemae",
    summary="ScaleMAE: MAE + GSD-scaled sin-cos positions + two-band (Laplacian) reconstruction loss",
    label="ScaleMAE",
    block="scalemae", spec=ScaleMaeSpec,
    objective=vit_objective.build_scalemae_objective,
    pretrain_keys=MAE.pretrain_keys + ("gsd", "reference_gsd"),
    importers=(("scalemae", vit_weights.import_scalemae),),  # the release .pth (ViT-L/16, timm keys)
)
MA3E = replace(
    MAE,
    name="ma3e",
    summary="MA3E: MAE with one randomly rotated crop per tile, an angle embedding on its tokens and an optimal-transport "
            "loss over it (Sinkhorn); pre-trained by the platform",
    label="MA3E",
    block="ma3e", spec=Ma3eSpec,
    objective=ma3e_objective.build_objective,
    pretrain_keys=MAE.pretrain_keys + ("window", "angle_range", "window_mask_ratio", "sinkhorn_eps", "sinkhorn_iterations"),
    checks=ma3e_rules.check,
    needs_pretraining_fn=None, unavailable=None, importers=(),  # no importer for its release (yet): always pre-trained here
)
SEGFORMER = Method(
    name="segformer",
    summary="SegFormer (transformers MiT-B4 + all-MLP decoder), random init or local ImageNet MiT weights (segformer.weights); fine-tuned",
    label="SegFormer-B4 (run here)",
    block="segformer", spec=SegformerSpec,
    encoder=segformer_encoder.build, skeleton=segformer_encoder.skeleton,
    checks=segformer_rules.check,
    heads=("segformer", "segformer"),
    tags=segformer_rules.tags, tag_keys=("backbone", "weights"),
    imports=("transformers.models.segformer.modeling_segformer",),
)
