"""The pre-trained ViT read at its blocks (the encoder contract) and the neck that turns its
single-stride blocks into a 4-scale pyramid."""

from __future__ import annotations

import torch
from torch import nn

from rsseg.encoders import FeatureInfo, freeze
from rsseg.errors import ConfigError
from rsseg.tensorfile import load_checked
from rsseg_baselines.vit.network import fill_positions, mae_config
from rsseg_baselines.vit.rules import gsd_scale


class VitEncoder(nn.Module):
    """The pre-trained ViT read at ``blocks``: each (B, D, H/p, W/p), stride p, without masking."""

    def __init__(self, config, blocks: tuple[int, ...], weights_id: str, imagenet_input: bool = False):
        super().__init__()
        from transformers import ViTMAEModel

        # public weights were trained on ImageNet-normalised [0, 1] images; ours on [-1, 1] tiles
        self.imagenet_input = imagenet_input

        cfg = config.__class__(**{**config.to_dict(), "mask_ratio": 0.0})
        self.vit = ViTMAEModel(cfg)
        if max(blocks) >= cfg.num_hidden_layers:
            raise ConfigError(f"mae.blocks: block {max(blocks)} does not exist (the ViT has {cfg.num_hidden_layers})")
        self.blocks = tuple(blocks)
        self.patch = cfg.patch_size
        self._weights_id = weights_id
        self.feature_info = [FeatureInfo(cfg.hidden_size, cfg.patch_size, f"block{b}", f"block{b}") for b in blocks]

    @property
    def cache_id(self) -> str:
        return self._weights_id

    def freeze(self) -> "VitEncoder":
        return freeze(self)

    def forward(self, x: torch.Tensor, keys=None, variants=None, parts=None) -> list[torch.Tensor]:
        if self.imagenet_input:
            from rsseg_baselines.stages import imagenet_normalise

            x = imagenet_normalise(x)
        emb = self.vit.embeddings
        b, _, h, w = x.shape
        pe = emb.position_embeddings
        tokens = emb.patch_embeddings(x) + pe[:, 1:, :]
        cls = (emb.cls_token + pe[:, :1, :]).expand(b, -1, -1)
        hs = torch.cat([cls, tokens], dim=1)
        out = {}
        for i, layer in enumerate(self.vit.layers[: max(self.blocks) + 1]):  # early exit after the last block read
            hs = layer(hs, None)
            if i in self.blocks:
                out[i] = hs[:, 1:].transpose(1, 2).reshape(b, -1, h // self.patch, w // self.patch)
        return [out[i] for i in self.blocks]


def load_vit(vit, state: dict[str, torch.Tensor], prefix: str, fixed_positions: bool = False) -> None:
    """Encoder weights out of a pre-training state dict: only the decoder (and ScaleMAE's low-band
    head, MA3E's angle embedding) may be left over; nothing of the encoder may be missing (but the fixed sin-cos position
    table, when it is rebuilt for another tile size)."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    leftover = sorted(k for k in state if not k.startswith(prefix))
    allowed = ("decoder.", "mae.decoder.", "low_pred.", "angle_embed")
    bad = [k for k in leftover if not k.startswith(allowed)]
    load_checked(vit, sub, "pre-trained ViT checkpoint does not fit", error=ConfigError, extra_unexpected=bad,
                 allowed_missing=frozenset({"embeddings.position_embeddings"} if fixed_positions else ()))


def skeleton(run, in_channels: int) -> VitEncoder:
    spec = getattr(run, run.method)
    return VitEncoder(mae_config(spec, run.data.tile_size, in_channels), spec.blocks, "skeleton")


def build_encoder(run, pretrained) -> VitEncoder:
    spec = getattr(run, run.method)
    if spec.weights:  # public weights, imported once
        from rsseg.checkpoints.store import imported

        pretrained = imported(spec.weights)
        if pretrained.method != run.method:
            raise ConfigError(f"{run.method}.weights: {spec.weights!r} are {pretrained.method} weights, not {run.method}")
    state = pretrained.load()
    desc = state["objective"]
    from transformers import ViTMAEConfig

    fields = {k: v for k, v in desc["config"].items() if k not in ("transformers_version", "model_type", "architectures")}
    resized = fields["image_size"] != run.data.tile_size
    if resized:
        # released at another image size (ViT-B/16: 224): MAE's position table is the fixed 2-D
        # sin-cos of the patch grid, so the table of this tile size is exact, not an interpolation
        if run.data.tile_size % fields["patch_size"]:
            raise ConfigError(f"data.tile_size: {run.data.tile_size} is not divisible by the ViT patch size {fields['patch_size']}")
        fields["image_size"] = run.data.tile_size
    config = ViTMAEConfig(**fields)
    # released ScaleMAE weights carry no position table of ours: it is the GSD-scaled sin-cos of this run's grid
    rebuild = resized or desc.get("positions") == "gsd"
    scale = gsd_scale(run) if desc["kind"] == "scalemae" and rebuild else 1.0
    enc = VitEncoder(config, spec.blocks, f"{pretrained.fingerprint}:{','.join(map(str, spec.blocks))}:{scale:g}",
                     imagenet_input=desc.get("input") == "imagenet")
    model = state["model"]
    if rebuild:
        model = {k: v for k, v in model.items() if not k.endswith("embeddings.position_embeddings")}
    # where the encoder sits: ViTMAEForPreTraining's "vit." (MAE), or "mae.vit." in the networks that
    # wrap it with a head or an embedding beside it (ScaleMAE, MA3E)
    prefix = "mae.vit." if any(k.startswith("mae.vit.") for k in model) else "vit."
    load_vit(enc.vit, model, prefix, fixed_positions=rebuild)
    if rebuild:
        fill_positions(enc.vit.embeddings.position_embeddings, scale)
    return enc


class SimplePyramid(nn.Module):
    """ViT blocks (all at stride p) -> strides p/4, p/2, p, 2p: deconv x4 (two stride-2 transposed
    convs), deconv x2, identity, max-pool — the neck of MAE's and ScaleMAE's UPerNet recipe."""

    def __init__(self, feature_info: list[FeatureInfo]):
        super().__init__()
        if len(feature_info) != 4:
            raise ConfigError(f"mae.blocks: the 4-scale neck needs 4 blocks, got {len(feature_info)}")
        d, p = feature_info[0].channels, feature_info[0].stride
        self.ops = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.BatchNorm2d(d), nn.GELU(), nn.ConvTranspose2d(d, d, 2, 2)),
            nn.ConvTranspose2d(d, d, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])
        self.feature_info = [FeatureInfo(d, s, fi.group, f"{fi.name}@{s}") for fi, s in zip(feature_info, (p // 4, p // 2, p, 2 * p))]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [op(f.float()) for op, f in zip(self.ops, features)]


def build_neck(run, feature_info) -> SimplePyramid:
    return SimplePyramid(feature_info)
