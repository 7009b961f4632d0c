"""MAE and ScaleMAE: a ViT pre-trained by the platform (shared trainer) on the same unlabelled
tiles as the DDPM, then read at blocks 3, 5, 7, 11 through a 4-scale neck.

- MAE (He et al. 2022): transformers' ``ViTMAEForPreTraining`` — 75 % of patches masked, the
  decoder reconstructs the masked patches' pixels, loss on per-patch normalised pixels.
- ScaleMAE (Reed et al. 2023): the same ViT with a GSD-scaled 2-D sin-cos positional encoding
  (patch grid x GSD ratio *before* the sin-cos) and a two-band (Laplacian) reconstruction loss:
  the decoder predicts a low-frequency band (the 2x average-pooled image) and a high-frequency
  band (the image minus the upsampled low band) of each masked patch. No library ships it;
  this is a compact implementation on the ViT, tested against the formulas.

ViT-B/16 is the paper's backbone; ``pico`` (width 64, 12 blocks, patch 8) keeps the same
structure (12 blocks, readout at 3, 5, 7, 11) small enough for a 2-core CPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rsseg.config.specs import OptimSpec, Strict
from rsseg.encoders import FeatureInfo, freeze
from rsseg.errors import ConfigError
from rsseg.pretrain.objective import bare
from rsseg.tensorfile import load_checked

SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16,
                 decoder_hidden_size=512, decoder_num_hidden_layers=8, decoder_num_attention_heads=16, decoder_intermediate_size=2048),
    "pico": dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, intermediate_size=128, patch_size=8,
                 decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=128),
}
# He et al.: AdamW betas 0.9 / 0.95, weight decay 0.05, cosine decay after a linear warm-up.
MAE_OPTIM = OptimSpec(lr=1.5e-4, warmup_start_lr=0.0, warmup_iterations=2000, after_warmup="cosine", weight_decay=0.05,
                      betas=(0.9, 0.95), grad_clip=None)


class MaeSpec(Strict):
    size: Literal["base", "pico"] = "base"
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    norm_pix_loss: bool = True
    optim: OptimSpec = MAE_OPTIM
    blocks: tuple[int, ...] = Field((3, 5, 7, 11), description="0-based blocks read for segmentation (the neck's four scales)")
    weights: str | None = Field(None, description="public weights imported under this name (`platform weights import DIR --format "
                                                  "vitmae --name NAME`) instead of pre-training here; None: pre-trained here")


class ScaleMaeSpec(MaeSpec):
    gsd: float | None = Field(None, gt=0, description="ground sample distance in metres; default: from the raster's transform")
    reference_gsd: float = Field(1.0, gt=0, description="GSD at which the positional encoding equals MAE's")


# ---------------------------------------------------------------------------------------------- maths


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-2k/dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int, scale: float = 1.0, cls_token: bool = True) -> np.ndarray:
    """MAE's 2-D sin-cos table ((1 + g^2, dim) with a zero cls row); ScaleMAE multiplies the patch
    grid by ``scale`` = GSD / reference GSD before the sin-cos (scale 1 = MAE)."""
    g = np.arange(grid_size, dtype=np.float64) * scale
    first, second = np.meshgrid(g, g)  # the order of transformers' get_2d_sincos_pos_embed
    emb = np.concatenate([sincos_1d(dim // 2, first), sincos_1d(dim // 2, second)], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0) if cls_token else emb


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), transformers' patch order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def two_bands(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Laplacian two-band split: low = 2x average pool (B, C, H/2, W/2); high = x - up(low)."""
    low = F.avg_pool2d(x, 2)
    high = x - F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False)
    return low, high


def _norm(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5


# ---------------------------------------------------------------------------------------------- networks


def mae_config(spec: MaeSpec, image_size: int, in_channels: int):
    from transformers import ViTMAEConfig

    cfg = dict(SIZES[spec.size])
    if image_size % cfg["patch_size"]:
        raise ConfigError(f"data.tile_size: {image_size} is not divisible by the ViT patch size {cfg['patch_size']}")
    return ViTMAEConfig(image_size=image_size, num_channels=in_channels, mask_ratio=spec.mask_ratio, norm_pix_loss=spec.norm_pix_loss,
                        **cfg)


def _fill(pe: torch.Tensor, scale: float) -> None:
    grid = int(math.isqrt(pe.shape[1] - 1))
    with torch.no_grad():
        pe.copy_(torch.from_numpy(sincos_2d(pe.shape[-1], grid, scale)).to(pe.dtype)[None])


def init_mae(net, scale: float = 1.0) -> None:
    """MAE's initialisation of what transformers 5 leaves at zero: its ``ViTMAEEmbeddings.
    initialize_weights`` returns early once the patch projection is marked initialised (it is,
    children first), so both fixed sin-cos tables stay zero — a ViT without positions. We fill
    the encoder and decoder tables (GSD-scaled for ScaleMAE) and draw the cls and mask tokens
    from N(0, 0.02) as He et al. do."""
    _fill(net.vit.embeddings.position_embeddings, scale)
    _fill(net.decoder.decoder_pos_embed, scale)
    with torch.no_grad():
        torch.nn.init.normal_(net.vit.embeddings.cls_token, std=0.02)
        torch.nn.init.normal_(net.decoder.mask_token, std=0.02)


class ScaleMaeNet(nn.Module):
    """ViTMAEForPreTraining + a low-band prediction head on the decoder's last hidden state."""

    def __init__(self, config, scale: float):
        super().__init__()
        from transformers import ViTMAEForPreTraining

        self.mae = ViTMAEForPreTraining(config)
        init_mae(self.mae, scale)
        p, c = config.patch_size, config.num_channels
        self.low_pred = nn.Linear(config.decoder_hidden_size, (p // 2) ** 2 * c)

    def forward(self, pixel_values: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.mae.vit(pixel_values, noise=noise)
        d = self.mae.decoder
        # transformers' ViTMAEDecoder.forward up to its norm (we need the hidden state for the low band)
        h = d.decoder_embed(out.last_hidden_state)
        ids = out.ids_restore
        mask_tokens = d.mask_token.repeat(h.shape[0], ids.shape[1] + 1 - h.shape[1], 1)
        tokens = torch.cat([h[:, 1:, :], mask_tokens], dim=1)
        tokens = torch.gather(tokens, 1, ids.unsqueeze(-1).repeat(1, 1, h.shape[2]))
        h = torch.cat([h[:, :1, :], tokens], dim=1) + d.decoder_pos_embed
        for layer in d.decoder_layers:
            h = layer(h)
        h = d.decoder_norm(h)[:, 1:]
        return d.decoder_pred(h), self.low_pred(h), out.mask


class MaeObjective:
    """The MAE objective for the shared trainer (network, optim, loss, describe, artifacts)."""

    name = "mae"

    def __init__(self, spec: MaeSpec, image_size: int, in_channels: int):
        from transformers import ViTMAEForPreTraining

        self.spec, self.optim = spec, spec.optim
        self.config = mae_config(spec, image_size, in_channels)
        self.network = ViTMAEForPreTraining(self.config)
        init_mae(self.network)

    def noise(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = (images.shape[-1] // self.config.patch_size) ** 2
        return torch.rand((images.shape[0], n), generator=generator).to(images.device)

    def loss(self, net, images, generator):
        out = net(pixel_values=images, noise=self.noise(images, generator))
        # logged terms stay device tensors: the trainer reads them back once per flush
        return out.loss.float(), {"masked_fraction": out.mask.detach().float().mean()}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "config": self.config.to_dict(), "spec": self.spec.model_dump(mode="json")}

    @torch.no_grad()
    def artifacts(self, net, images, generator, out_dir: Path, *, samples: int = 0, sample_steps: int = 0) -> list[Path]:
        """Originals, masked inputs and reconstructions of a few tiles."""
        from rsseg.viz import save_grid

        net.eval()
        x = images[:4]
        out = net(pixel_values=x, noise=self.noise(x, generator))
        p = self.config.patch_size
        target = patchify(x, p)
        pred = out.logits.float()
        if self.config.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        m = out.mask.unsqueeze(-1)
        fold = bare(net).unpatchify
        masked = fold(target * (1 - m))
        recon = fold(pred * m + target * (1 - m))
        net.train()
        return [save_grid([x, masked, recon.clamp(-1, 1)], out_dir / "reconstruction.png", ["tile", "masked 75 %", "reconstruction"])]


class ScaleMaeObjective(MaeObjective):
    name = "scalemae"

    def __init__(self, spec: ScaleMaeSpec, image_size: int, in_channels: int, gsd: float):
        self.spec, self.optim = spec, spec.optim
        self.config = mae_config(spec, image_size, in_channels)
        self.gsd = gsd
        self.scale = gsd / spec.reference_gsd
        self.network = ScaleMaeNet(self.config, self.scale)

    def loss(self, net, images, generator):
        p = self.config.patch_size
        high_pred, low_pred, mask = net(images, self.noise(images, generator))
        low, high = two_bands(images.float())
        low_t, high_t = patchify(low, p // 2), patchify(high, p)
        if self.spec.norm_pix_loss:
            low_t = _norm(low_t)
        l_low = ((low_pred.float() - low_t) ** 2).mean(-1)
        l_high = ((high_pred.float() - high_t) ** 2).mean(-1)
        n = mask.sum()
        low_loss, high_loss = (l_low * mask).sum() / n, (l_high * mask).sum() / n
        return low_loss + high_loss, {"loss_low": low_loss.detach(), "loss_high": high_loss.detach()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "gsd": self.gsd, "scale": self.scale}

    @torch.no_grad()
    def artifacts(self, net, images, generator, out_dir: Path, *, samples: int = 0, sample_steps: int = 0) -> list[Path]:
        from rsseg.viz import save_grid

        net.eval()
        x = images[:4]
        high_pred, low_pred, mask = net(x, self.noise(x, generator))
        p = self.config.patch_size
        low, high = two_bands(x.float())
        mae = bare(net).mae
        m = mask.unsqueeze(-1)
        high_rec = mae.unpatchify(high_pred.float() * m + patchify(high, p) * (1 - m))
        net.train()
        return [save_grid([x, high.clamp(-1, 1), high_rec.clamp(-1, 1)], out_dir / "high_band.png",
                          ["tile", "high band", "high band, masked patches predicted"])]


# ---------------------------------------------------------------------------------------------- encoder


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
        from rsseg.weights import imported

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
    scale = _gsd_scale(run) if desc["kind"] == "scalemae" and rebuild else 1.0
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
        _fill(enc.vit.embeddings.position_embeddings, scale)
    return enc


def _gsd_scale(run) -> float:
    spec = run.scalemae
    gsd = spec.gsd if spec.gsd is not None else raster_gsd(run)
    if gsd is None:
        raise ConfigError(f"scalemae.gsd: {run.data.dataset}'s rasters carry no georeferenced transform; give the ground sample distance in metres")
    return gsd / spec.reference_gsd


def needs_pretraining(run) -> bool:
    return getattr(run, run.method).weights is None


def public_weights_unavailable(run) -> str | None:
    from rsseg.pretrain.store import imported_fingerprint
    from rsseg.workdir import Workdir

    name = getattr(run, run.method).weights
    if name and imported_fingerprint(Workdir.resolve(), name) is None:
        how = "DIR --format vitmae" if run.method == "mae" else "RELEASE.pth --format scalemae"
        return (f"{run.method}.weights: public weights {name!r} are not imported (`platform weights import {how} "
                f"--name {name}`), so this cell is skipped")
    return None


def import_vitmae(path: Path) -> dict[str, Any]:
    """A transformers ViTMAE directory (``ViTMAEForPreTraining`` as released, e.g. MAE ViT-B/16, or
    ``ViTMAEModel``) -> the store's final-state form. Only the MAE decoder may be left over; every
    encoder key must be there with its shape."""
    from transformers import ViTMAEModel
    from transformers.utils import logging as hf_logging

    from rsseg.errors import CheckpointError

    if not (path.is_dir() and (path / "config.json").is_file()):
        raise CheckpointError(f"{path}: not a transformers ViTMAE directory (expected config.json and model.safetensors)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would print, as a table, the keys checked below
    try:
        vit, info = ViTMAEModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable directory reads the same to the user
        raise CheckpointError(f"{path}: not loadable as a ViTMAE ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(("decoder.", "vit.decoder.")))
    problems = [f"missing {', '.join(sorted(info['missing_keys'])[:4])}" if info["missing_keys"] else "",
                f"unexpected {', '.join(unexpected[:4])}" if unexpected else "",
                f"mis-shaped {', '.join(sorted(str(k) for k in info['mismatched_keys'])[:4])}" if info["mismatched_keys"] else ""]
    if any(problems):
        raise CheckpointError(f"{path}: does not fit the ViTMAE of its config.json: {'; '.join(p for p in problems if p)}")
    return {"model": {f"vit.{k}": v.float() for k, v in vit.state_dict().items()}, "ema": None, "imported": True,
            "objective": {"kind": "mae", "config": vit.config.to_dict(), "input": "imagenet"}}


# ViT widths of the released checkpoints -> attention heads (head width 64, ViT-H 80)
VIT_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16}
# what a ScaleMAE / MAE pre-training checkpoint holds besides the encoder (decoders, FPN, mask token)
RELEASE_LEFTOVERS = ("decoder", "mask_token", "fpn", "fcn_high", "fcn_low", "pos_embed", "fc_norm")


def _timm_vit_keys(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm VisionTransformer keys (MAE / ScaleMAE releases) -> transformers ViTMAEModel's; the fused
    qkv projection (3D, D) splits into q, k, v in that order."""
    out = {"embeddings.cls_token": state["cls_token"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            q, k, v = state[src + f"attn.qkv.{part}"].chunk(3, dim=0)
            out |= {dst + f"attention.q_proj.{part}": q, dst + f"attention.k_proj.{part}": k, dst + f"attention.v_proj.{part}": v,
                    dst + f"attention.o_proj.{part}": state[src + f"attn.proj.{part}"],
                    dst + f"layernorm_before.{part}": state[src + f"norm1.{part}"],
                    dst + f"layernorm_after.{part}": state[src + f"norm2.{part}"],
                    dst + f"mlp.fc1.{part}": state[src + f"mlp.fc1.{part}"], dst + f"mlp.fc2.{part}": state[src + f"mlp.fc2.{part}"]}
    return out


def import_scalemae(path: Path) -> dict[str, Any]:
    """ScaleMAE's release checkpoint (``{"model": state}``, timm ViT keys, ViT-L/16) -> the store's
    final-state form: the encoder as a transformers ViTMAE (keys mapped, every one accounted for:
    only the decoders, FPN, mask token and the position table are left over — the table is
    rebuilt from each run's GSD, as ScaleMAE computes it)."""
    import argparse
    import re

    from transformers import ViTMAEConfig, ViTMAEModel

    from rsseg.errors import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"{path}: not a ScaleMAE checkpoint file (expected the release .pth)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the release stores its training args
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: not readable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{path}: no ViT encoder in it (expected 'model' with cls_token, patch_embed.proj.weight, blocks.N.*)")
    state = {re.sub(r"^(module\.)", "", k): v for k, v in state.items()}
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    width, channels, patch = state["patch_embed.proj.weight"].shape[:3]
    if width not in VIT_HEADS:
        raise CheckpointError(f"{path}: a ViT {width} wide; known widths: {', '.join(map(str, VIT_HEADS))}")
    config = ViTMAEConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=VIT_HEADS[width], patch_size=patch,
                          num_channels=channels, image_size=224, intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
                          layer_norm_eps=1e-6, mask_ratio=0.0)
    try:
        mapped = _timm_vit_keys(state, depth)
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing {exc.args[0]} (a timm ViT encoder key)") from None
    used = {"cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"} | {
        k for k in state if k.startswith("blocks.") and int(k.split(".")[1]) < depth}
    unexpected = sorted(k for k in state if k not in used and not k.startswith(RELEASE_LEFTOVERS))
    with torch.device("meta"):
        own = ViTMAEModel(config).state_dict()
    wrong = [k for k, v in mapped.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if unexpected or wrong:
        what = [f"unexpected {', '.join(unexpected[:4])}" if unexpected else "", f"mis-shaped {', '.join(wrong[:4])}" if wrong else ""]
        raise CheckpointError(f"{path}: does not fit a ViT of {depth} blocks, {width} wide: {'; '.join(w for w in what if w)}")
    return {"model": {f"mae.vit.{k}": v.float() for k, v in mapped.items()}, "ema": None, "imported": True,
            "objective": {"kind": "scalemae", "config": config.to_dict(), "input": "imagenet", "positions": "gsd"}}


# ---------------------------------------------------------------------------------------------- neck


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


# ---------------------------------------------------------------------------------------------- objectives


def raster_gsd(run) -> float | None:
    """Ground sample distance in metres of the dataset's first labelled scene (None when it is
    not georeferenced)."""
    from rsseg.data import registry
    from rsseg.data.scenes import raster_meta

    meta = raster_meta(registry.scenes(run.data).labelled[0].image)
    if not (meta.georeferenced and meta.crs):
        return None
    from rasterio.crs import CRS

    size = abs(float(meta.transform[0]))  # pixel width in CRS units
    crs = CRS.from_string(meta.crs)
    # geographic CRS: degrees -> metres at the equator (the scale is a ratio; this is close enough)
    return size * 111_320.0 if crs.is_geographic else size * (crs.linear_units_factor[1] if crs.linear_units_factor else 1.0)


def build_mae_objective(run, in_channels: int) -> MaeObjective:
    return MaeObjective(run.mae, run.data.tile_size, in_channels)


def build_scalemae_objective(run, in_channels: int) -> ScaleMaeObjective:
    spec = run.scalemae
    gsd = spec.gsd
    if gsd is None:
        gsd = raster_gsd(run)
    if gsd is None:
        raise ConfigError(f"scalemae.gsd: {run.data.dataset}'s rasters carry no georeferenced transform; give the ground sample distance in metres")
    return ScaleMaeObjective(spec, run.data.tile_size, in_channels, gsd)


def mae_tags(run) -> dict[str, object]:
    spec = getattr(run, run.method)
    return {"backbone": f"vit-{spec.size}", "blocks": ",".join(map(str, spec.blocks)),
            "weights": f"public:{spec.weights}" if spec.weights else "pre-trained here"}
