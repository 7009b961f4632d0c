"""Released ViT weights -> the store's final-state form: a transformers ViTMAE directory (MAE)
and ScaleMAE's release checkpoint (timm keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rsseg.tensorfile import key_problems


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
    problems = key_problems(info["missing_keys"], info["unexpected_keys"], allowed_unexpected=("decoder.", "vit.decoder."))
    if info["mismatched_keys"]:
        problems.append(f"mis-shaped {', '.join(sorted(str(k) for k in info['mismatched_keys'])[:4])}")
    if problems:
        raise CheckpointError(f"{path}: does not fit the ViTMAE of its config.json: {'; '.join(problems)}")
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
