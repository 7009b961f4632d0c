"""DDPM weights in and out: loading a UNet with an asserted key set, and converting released
weights into the store's form.

Formats (``platform weights import PATH --format ...``):

- ``diffusers``: a ``UNet2DModel`` directory in ``save_pretrained`` layout (``config.json`` +
  ``diffusion_pytorch_model.safetensors`` or ``.bin``). A ``"rsseg"`` entry in the config (written
  by `export_diffusers`) carries what diffusers' config cannot say: SR3 conditioning and the
  schedule; without it the UNet is a plain timestep-conditioned diffusers model.
- ``ddpm-cd``: DDPM-CD's SR3 generator checkpoint (``*_gen.pth``): the state dict of its
  ``GaussianDiffusion`` (``denoise_fn.`` + the ``model/sr3_modules/unet.py`` UNet, and the
  schedule's buffers ``betas``, ``alphas_cumprod``, ...). It is mapped onto the ``sr3`` preset
  with an explicit, complete key map (`sr3_key_map`): every source key is used exactly once,
  every target key is filled, every shape checked; anything else is a one-line error listing the
  keys. SR3's fused 1x1 ``qkv`` convolution (one head: q, k, v are its thirds) is split into
  diffusers' ``to_q`` / ``to_k`` / ``to_v`` (whose biases SR3 does not have: zero), its 1x1
  convolutions become linear layers, and its noise-level MLP (``noise_level_mlp.1`` / ``.3``)
  becomes the preset's time embedding. The linear beta schedule stored with the weights travels
  with them.

SR3's UNet (per level: ``res_blocks`` resnets + a downsampler; ``mid``: resnet + attention,
resnet; the decoder: ``res_blocks + 1`` resnets + an upsampler per level), as a list of modules:
``init_conv`` (or ``downs.0`` in the original SR3 layout), ``downs.<k>``, ``mid.<k>``,
``ups.<k>``, ``final_conv``; a resnet block is ``res_block.{block1.block.0 (GroupNorm),
block1.block.3 (conv), noise_func.noise_func.0 (linear), block2.block.0, block2.block.3,
res_conv}`` and, with attention, ``attn.{norm, qkv, out}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rsseg.errors import CheckpointError, ConfigError

# diffusers' UNet2DModel has no non-persistent buffers: a DDPM checkpoint of this UNet must have
# exactly its keys, none missing and none left over.
ALLOWED_MISSING: frozenset[str] = frozenset()
ALLOWED_UNEXPECTED: frozenset[str] = frozenset()
# DDPM-CD's GaussianDiffusion buffers: the schedule (read, then dropped from the network's keys)
SR3_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
SR3_RES_BLOCKS = 2  # DDPM-CD's config/ddpm_train.json


def load_unet_weights(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from rsseg.tensorfile import load_checked

    load_checked(unet, state, "DDPM checkpoint does not fit the UNet", error=ConfigError,
                 allowed_missing=ALLOWED_MISSING, allowed_unexpected=ALLOWED_UNEXPECTED)


def unet_weights(unet: torch.nn.Module, state: dict[str, Any], which: str) -> None:
    """Load the ``ema`` (default for features) or ``raw`` weights of a pre-training state (an
    imported state has no EMA: its weights are the release's)."""
    if which == "ema" and state.get("ema") is not None:
        load_unet_weights(unet, {k: v.to(unet.dtype) for k, v in state["ema"]["shadow"].items()})
    elif which == "ema" and not state.get("imported"):
        raise ConfigError("ddpm.features.weights: ema requested but the pre-training kept no EMA (pretrain.ema.enabled: false)")
    else:
        load_unet_weights(unet, state["model"])


# ---------------------------------------------------------------------------------------------- SR3 -> sr3 preset


@dataclass(frozen=True)
class Mapped:
    """One target key of the UNet2DModel and how it is filled."""

    target: str
    source: str | None  # None: filled with zeros (a bias SR3 does not have)
    transform: str = ""  # "", "linear" (1x1 conv -> linear), "q" / "k" / "v" (a third of the fused qkv, as linear)


def _sr3_layout(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What an SR3 state dict says about its UNet: the input conv's name, the channel of each
    level and which levels attend (the rest is DDPM-CD's fixed recipe: 2 resnets per level)."""
    keys = set(state)
    conv_in = "init_conv" if "init_conv.weight" in keys else "downs.0"
    if f"{conv_in}.weight" not in keys or "noise_level_mlp.1.weight" not in keys:
        raise ConfigError("not an SR3 UNet state dict: no init_conv.weight / downs.0.weight or no noise_level_mlp.1.weight "
                          f"(found {', '.join(sorted(keys)[:4])} ...)")
    first = 0 if conv_in == "init_conv" else 1
    n_downs = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("downs.")) - first
    levels = (n_downs + 1) // (SR3_RES_BLOCKS + 1)
    if levels * (SR3_RES_BLOCKS + 1) - 1 != n_downs:
        raise ConfigError(f"SR3 state dict: {n_downs} encoder modules do not make levels of {SR3_RES_BLOCKS} resnets + a downsampler")
    channels, attends = [], []
    for level in range(levels):
        k = first + level * (SR3_RES_BLOCKS + 1)
        w = state.get(f"downs.{k}.res_block.block1.block.3.weight")
        if w is None:
            raise ConfigError(f"SR3 state dict: downs.{k}.res_block.block1.block.3.weight is missing")
        channels.append(int(w.shape[0]))
        attends.append(f"downs.{k}.attn.qkv.weight" in keys)
    return {"conv_in": conv_in, "first": first, "channels": tuple(channels), "attends": tuple(attends),
            "in_channels": int(state[f"{conv_in}.weight"].shape[1]), "out_channels": int(state["final_conv.block.3.weight"].shape[0])
            if "final_conv.block.3.weight" in keys else int(state[f"{conv_in}.weight"].shape[1]),
            "mlp_hidden": int(state["noise_level_mlp.1.weight"].shape[0])}


def sr3_unet_config(layout: dict[str, Any], sample_size: int = 256, norm_groups: int = 32) -> dict[str, Any]:
    """The ``sr3`` preset's config with the checkpoint's channels, attention levels, embedding
    sizes and (given: a state dict cannot say) GroupNorm groups."""
    from rsseg.methods.ddpm.unet import unet_config

    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in layout["attends"])
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(layout["attends"]))
    bad = [c for c in layout["channels"] if c % norm_groups]
    if bad:
        raise ConfigError(f"--norm-groups {norm_groups}: does not divide the checkpoint's {bad[0]} channels")
    cfg = unet_config("sr3", {"block_out_channels": list(layout["channels"]), "down_block_types": list(down),
                              "up_block_types": list(up), "norm_num_groups": norm_groups},
                      in_channels=layout["in_channels"], sample_size=sample_size)
    cfg["out_channels"] = layout["out_channels"]
    cfg["conditioning"] = {**cfg["conditioning"], "mlp_hidden": layout["mlp_hidden"]}
    return cfg


def _resnet(target: str, source: str, shortcut: bool) -> list[Mapped]:
    out = [Mapped(f"{target}.norm1.weight", f"{source}.res_block.block1.block.0.weight"),
           Mapped(f"{target}.norm1.bias", f"{source}.res_block.block1.block.0.bias"),
           Mapped(f"{target}.conv1.weight", f"{source}.res_block.block1.block.3.weight"),
           Mapped(f"{target}.conv1.bias", f"{source}.res_block.block1.block.3.bias"),
           Mapped(f"{target}.time_emb_proj.weight", f"{source}.res_block.noise_func.noise_func.0.weight"),
           Mapped(f"{target}.time_emb_proj.bias", f"{source}.res_block.noise_func.noise_func.0.bias"),
           Mapped(f"{target}.norm2.weight", f"{source}.res_block.block2.block.0.weight"),
           Mapped(f"{target}.norm2.bias", f"{source}.res_block.block2.block.0.bias"),
           Mapped(f"{target}.conv2.weight", f"{source}.res_block.block2.block.3.weight"),
           Mapped(f"{target}.conv2.bias", f"{source}.res_block.block2.block.3.bias")]
    if shortcut:
        out += [Mapped(f"{target}.conv_shortcut.weight", f"{source}.res_block.res_conv.weight"),
                Mapped(f"{target}.conv_shortcut.bias", f"{source}.res_block.res_conv.bias")]
    return out


def _attention(target: str, source: str) -> list[Mapped]:
    out = [Mapped(f"{target}.group_norm.weight", f"{source}.attn.norm.weight"),
           Mapped(f"{target}.group_norm.bias", f"{source}.attn.norm.bias")]
    for part in ("q", "k", "v"):
        out += [Mapped(f"{target}.to_{part}.weight", f"{source}.attn.qkv.weight", part), Mapped(f"{target}.to_{part}.bias", None)]
    return out + [Mapped(f"{target}.to_out.0.weight", f"{source}.attn.out.weight", "linear"),
                  Mapped(f"{target}.to_out.0.bias", f"{source}.attn.out.bias")]


def sr3_key_map(layout: dict[str, Any]) -> list[Mapped]:
    """Every key of the sr3-preset UNet2DModel, with its SR3 source (the complete map)."""
    chans, attends, r = layout["channels"], layout["attends"], SR3_RES_BLOCKS
    m = [Mapped("conv_in.weight", f"{layout['conv_in']}.weight"), Mapped("conv_in.bias", f"{layout['conv_in']}.bias"),
         Mapped("time_embedding.linear_1.weight", "noise_level_mlp.1.weight"), Mapped("time_embedding.linear_1.bias", "noise_level_mlp.1.bias"),
         Mapped("time_embedding.linear_2.weight", "noise_level_mlp.3.weight"), Mapped("time_embedding.linear_2.bias", "noise_level_mlp.3.bias")]
    k = layout["first"]
    prev = chans[0]
    for level, c in enumerate(chans):
        for j in range(r):
            m += _resnet(f"down_blocks.{level}.resnets.{j}", f"downs.{k}", shortcut=(prev if j == 0 else c) != c)
            if attends[level]:
                m += _attention(f"down_blocks.{level}.attentions.{j}", f"downs.{k}")
            k += 1
        prev = c
        if level < len(chans) - 1:
            m += [Mapped(f"down_blocks.{level}.downsamplers.0.conv.weight", f"downs.{k}.conv.weight"),
                  Mapped(f"down_blocks.{level}.downsamplers.0.conv.bias", f"downs.{k}.conv.bias")]
            k += 1
    m += _resnet("mid_block.resnets.0", "mid.0", False) + _attention("mid_block.attentions.0", "mid.0")
    m += _resnet("mid_block.resnets.1", "mid.1", False)
    # decoder: level channels from the deepest; each resnet takes the previous output + one skip
    skips = [chans[0]]
    for level, c in enumerate(chans):
        skips += [c] * r
        if level < len(chans) - 1:
            skips.append(c)
    k, prev = 0, chans[-1]
    for i, level in enumerate(reversed(range(len(chans)))):
        c = chans[level]
        for j in range(r + 1):
            m += _resnet(f"up_blocks.{i}.resnets.{j}", f"ups.{k}", shortcut=prev + skips.pop() != c)
            if attends[level]:
                m += _attention(f"up_blocks.{i}.attentions.{j}", f"ups.{k}")
            prev = c
            k += 1
        if level > 0:
            m += [Mapped(f"up_blocks.{i}.upsamplers.0.conv.weight", f"ups.{k}.conv.weight"),
                  Mapped(f"up_blocks.{i}.upsamplers.0.conv.bias", f"ups.{k}.conv.bias")]
            k += 1
    return m + [Mapped("conv_norm_out.weight", "final_conv.block.0.weight"), Mapped("conv_norm_out.bias", "final_conv.block.0.bias"),
                Mapped("conv_out.weight", "final_conv.block.3.weight"), Mapped("conv_out.bias", "final_conv.block.3.bias")]


def _value(mapped: Mapped, source: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if mapped.source is None:
        return torch.zeros(like.shape, dtype=torch.float32)
    w = source[mapped.source]
    if mapped.transform in ("q", "k", "v"):
        third = w.shape[0] // 3  # one head: q, k, v are the fused conv's consecutive thirds
        w = w[{"q": 0, "k": 1, "v": 2}[mapped.transform] * third:][:third]
    if mapped.transform and w.dim() == 4 and tuple(w.shape[2:]) == (1, 1):
        w = w.reshape(w.shape[0], w.shape[1])  # a 1x1 conv is a linear layer (anything else: a shape error below)
    return w.clone()


def _listed(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def convert_sr3(state: dict[str, torch.Tensor], sample_size: int = 256, norm_groups: int = 32) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SR3 (DDPM-CD) UNet weights -> (the sr3 preset's UNet2DModel config, its state dict)."""
    from rsseg.methods.ddpm.unet import build_unet

    layout = _sr3_layout(state)
    cfg = sr3_unet_config(layout, sample_size, norm_groups)
    with torch.device("meta"):
        target = build_unet(cfg).state_dict()
    mapping = sr3_key_map(layout)
    by_target = {m.target: m for m in mapping}
    used = [m.source for m in mapping if m.source is not None]
    unfilled = sorted(set(target) - set(by_target))
    unknown_targets = sorted(set(by_target) - set(target))
    # each source key once (the fused qkv three times: its thirds)
    once = [m.source for m in mapping if m.source is not None and m.transform not in ("q", "k", "v")]
    twice = sorted({s for s in once if once.count(s) > 1})
    missing = sorted(s for s in dict.fromkeys(used) if s not in state)
    unused = sorted(set(state) - set(used))
    problems = []
    if missing:
        problems.append(f"missing source key(s) {_listed(missing)}")
    if unused:
        problems.append(f"unexpected key(s) {_listed(unused)}")
    if unfilled or unknown_targets:
        problems.append(f"target keys without a source {_listed(unfilled)}; map targets not in the UNet {_listed(unknown_targets)}")
    if twice:
        problems.append(f"source key(s) used twice {_listed(twice)}")
    if problems:
        raise ConfigError("SR3 weights do not map onto the sr3 preset: " + "; ".join(problems))
    out, wrong = {}, []
    for key, like in target.items():
        value = _value(by_target[key], state, like)
        if tuple(value.shape) != tuple(like.shape):
            wrong.append(f"{by_target[key].source} {tuple(state[by_target[key].source].shape)} -> {key} expects {tuple(like.shape)}")
        out[key] = value.float()
    if wrong:
        raise ConfigError(f"SR3 weights have mis-shaped key(s): {_listed(wrong, 3)}")
    return cfg, out


def cosine_betas(steps: int, s: float = 8e-3) -> torch.Tensor:
    """SR3's / DDPM-CD's ``make_beta_schedule("cosine")`` (Nichol & Dhariwal): float64 (steps,)."""
    import math

    t = torch.arange(steps + 1, dtype=torch.float64) / steps + s
    alphas = torch.cos(t / (1 + s) * math.pi / 2).pow(2)
    alphas = alphas / alphas[0]
    return (1 - alphas[1:] / alphas[:-1]).clamp(max=0.999)


def schedule_from_betas(betas: torch.Tensor) -> dict[str, Any]:
    """What schedule a checkpoint's stored betas are: linear (with its ends), cosine, or another
    (``kind: other``). Stored as float32: 6 significant digits give back the configured values."""
    b = betas.double()
    n = len(b)
    ends = {"train_steps": n, "beta_start": float(f"{float(b[0]):.6g}"), "beta_end": float(f"{float(b[-1]):.6g}")}
    if torch.allclose(b, torch.linspace(float(b[0]), float(b[-1]), n, dtype=torch.float64), rtol=1e-6, atol=1e-12):
        return {"kind": "linear", **ends}
    if torch.allclose(b, cosine_betas(n), rtol=1e-4, atol=1e-7):
        return {"kind": "cosine", **ends}
    return {"kind": "other", **ends}


def _describe(schedule: dict[str, Any]) -> str:
    if schedule["kind"] == "cosine":
        return f"cosine over {schedule['train_steps']} steps"
    return f"{schedule['kind']} {schedule['beta_start']:g} -> {schedule['beta_end']:g} over {schedule['train_steps']} steps"


# DDPM-CD's change-detection configs (config/levir.json, ...) extract features from its released
# model under this schedule, recomputed, whatever betas the checkpoint saved.
CD_SCHEDULE = "ddpm_cd"


def features_schedule(found: dict[str, Any] | None, choice: str) -> dict[str, Any]:
    """The schedule imported weights are read under: a named preset (default DDPM-CD's change
    detection one), or ``checkpoint``: the one the checkpoint's betas are (linear or cosine)."""
    from rsseg.methods.ddpm.spec import SCHEDULE_PRESETS, NoiseScheduleSpec

    if choice == "checkpoint":
        if found is None or found["kind"] == "other":
            what = "no betas" if found is None else "betas that are neither linear nor cosine"
            raise ConfigError(f"--schedule checkpoint: the checkpoint has {what}; name a schedule ({', '.join(SCHEDULE_PRESETS)})")
        return NoiseScheduleSpec(**found).model_dump(mode="json")
    if choice not in SCHEDULE_PRESETS:
        raise ConfigError(f"--schedule {choice!r}: expected checkpoint or one of {', '.join(SCHEDULE_PRESETS)}")
    return NoiseScheduleSpec(preset=choice).model_dump(mode="json")


def import_ddpm_cd(path: Path, norm_groups: int | None = None, schedule: str | None = None) -> dict[str, Any]:
    """A DDPM-CD ``*_gen.pth`` -> the store's final-state form (model, objective, schedule).

    The network is built from the checkpoint's shapes (width, multipliers, attention levels,
    embedding sizes; 64 or 128 wide); GroupNorm groups cannot be read from a state dict
    (``norm_groups``, default DDPM-CD's 32, said in the notes). The features' schedule is
    DDPM-CD's change-detection one unless ``schedule`` names another; the one the checkpoint's
    betas are is kept beside it (``trained_schedule``) and said in the notes."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file reads the same to the user
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (DDPM-CD's *_gen.pth)")
    state = {k.removeprefix("denoise_fn."): v for k, v in raw.items()}
    found = schedule_from_betas(state["betas"]) if "betas" in state else None
    unet_state = {k: v for k, v in state.items() if k not in SR3_SCHEDULE_BUFFERS}
    groups = norm_groups or 32
    try:
        cfg, converted = convert_sr3(unet_state, norm_groups=groups)
        used = features_schedule(found, schedule or CD_SCHEDULE)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    width = cfg["block_out_channels"]
    notes = [f"network: SR3, inner channel {width[0]}, channels {', '.join(map(str, width))}, "
             f"{sum(v.numel() for v in converted.values()) / 1e6:.1f} M parameters",
             f"GroupNorm: {groups} groups" + (" (given)" if norm_groups else " assumed (DDPM-CD's norm_groups; a state dict cannot say "
                                                                           "it: --norm-groups N if the network was trained with another)"),
             f"schedule in the checkpoint: {_describe(found) if found else 'none (no betas saved)'}",
             f"schedule for its features: {_describe(used)}" + (" (DDPM-CD's change-detection schedule; --schedule checkpoint "
                                                                 "or a preset for another)" if not schedule else " (given)")]
    return {"model": converted, "ema": None, "imported": True, "trained_schedule": found, "notes": notes,
            "objective": {"kind": "ddpm", "unet": _jsonable(cfg), "schedule": used}}


# ---------------------------------------------------------------------------------------------- diffusers directories


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    from rsseg.methods.ddpm.unet import jsonable

    return jsonable(cfg)


DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def import_diffusers(path: Path) -> dict[str, Any]:
    """A ``UNet2DModel.save_pretrained`` directory -> the store's final-state form."""
    from rsseg.methods.ddpm.spec import NoiseScheduleSpec
    from rsseg.methods.ddpm.unet import UNET_ARGS

    config_path = path / "config.json"
    if not path.is_dir() or not config_path.is_file():
        raise CheckpointError(f"{path}: not a diffusers UNet2DModel directory (expected config.json and {DIFFUSERS_WEIGHTS[0]})")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"{config_path}: a {config.get('_class_name')}, expected a UNet2DModel")
    extra = config.get("rsseg", {})
    cfg = {k: v for k, v in config.items() if k in UNET_ARGS}
    if extra.get("conditioning"):
        cfg["conditioning"] = extra["conditioning"]
    weights = next((path / n for n in DIFFUSERS_WEIGHTS if (path / n).exists()), None)
    if weights is None:
        raise CheckpointError(f"{path}: no {' or '.join(DIFFUSERS_WEIGHTS)}")
    from rsseg.tensorfile import read_tensors

    try:
        state = read_tensors(weights)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{weights}: not readable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    from rsseg.methods.ddpm.unet import build_unet

    with torch.device("meta"):
        own = build_unet(cfg).state_dict()
    from rsseg.tensorfile import key_problems

    problems = key_problems(own.keys() - state.keys(), state.keys() - own.keys())
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        problems.append(f"mis-shaped {_listed(wrong)}")
    if problems:
        raise CheckpointError(f"{weights}: does not fit the UNet2DModel of its config.json: {'; '.join(problems)}")
    schedule = NoiseScheduleSpec(**extra["schedule"]) if extra.get("schedule") else NoiseScheduleSpec(
        train_steps=int(config.get("num_train_timesteps") or 1000))
    return {"model": {k: v.float() for k, v in state.items()}, "ema": None, "imported": True,
            "objective": {"kind": "ddpm", "unet": _jsonable(cfg), "schedule": schedule.model_dump(mode="json")}}


def export_diffusers(state: dict[str, Any], out: Path, which: str = "ema") -> Path:
    """A store state (pre-trained or imported) -> a ``save_pretrained`` directory that diffusers
    loads (``UNet2DModel.from_pretrained``) and `import_diffusers` reads back exactly."""
    from rsseg.methods.ddpm.unet import build_unet

    cfg = dict(state["objective"]["unet"])
    net = build_unet(cfg)
    unet_weights(net, state, which)
    net.save_pretrained(str(out), safe_serialization=True)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["rsseg"] = {"conditioning": cfg.get("conditioning"), "schedule": state["objective"]["schedule"]}
    config_path.write_text(json.dumps(config, indent=2))
    return out


IMPORTERS: dict[str, Callable[[Path], dict[str, Any]]] = {"diffusers": import_diffusers, "ddpm-cd": import_ddpm_cd}
