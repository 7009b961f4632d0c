"""DDPM features: a pre-trained UNet's intermediate maps at chosen noise levels.

Maps. Decoder side (the paper's choice): ``up_blocks[i]`` runs at stride 2^(L-1-i) for an
L-level UNet; its native-resolution maps are the outputs of ``resnets[j]`` (followed by
``attentions[j]`` in attention blocks), *before* the block's upsampler. For sr3 / ho256 at
256 px these are 3 maps x 4 levels at 1/16, 1/8, 1/4, 1/2: the paper's 12 maps. Encoder side
(Table 1's "DDPM encoder" column): ``down_blocks[i].resnets[j]`` outputs at stride 2^i.

Noise. x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, in float32; t = 0 is the clean image.
``fixed`` noise is seeded per (noise seed, tile, t): deterministic, hence cacheable. ``fresh``
noise is new at every call (the paper's noise-based augmentation).

Cost. All (image, t) pairs of a batch go through one forward ((T * B, C, H, W), t-major), and the
forward is an explicit copy of diffusers' ``UNet2DModel.forward`` that stops after the last map it
needs (the full-resolution up block, the most expensive one, never runs for maps down to 1/2).
The explicit forward (rather than hooks) also keeps the extractor compatible with
``torch.compile``. Maps stay at native resolution.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rsseg.config.specs import DdpmFeaturesSpec, NoiseScheduleSpec
from rsseg.encoders import FeatureInfo, freeze
from rsseg.errors import ConfigError
from rsseg.provenance import fingerprint


@dataclass(frozen=True)
class MapRef:
    side: str  # "decoder" | "encoder"
    block: int
    layer: int
    stride: int
    channels: int

    @property
    def name(self) -> str:
        return f"{'up' if self.side == 'decoder' else 'down'}{self.block}.{self.layer}"


def available_maps(unet, side: str) -> list[MapRef]:
    """Every native-resolution map of one side, shallow to deep in execution order."""
    levels = len(unet.config.block_out_channels)
    out = []
    if side == "decoder":
        for i, up in enumerate(unet.up_blocks):
            for j, resnet in enumerate(up.resnets):
                out.append(MapRef("decoder", i, j, 2 ** (levels - 1 - i), resnet.out_channels))
    else:
        for i, down in enumerate(unet.down_blocks):
            for j, resnet in enumerate(down.resnets):
                out.append(MapRef("encoder", i, j, 2**i, resnet.out_channels))
    return out


def select_maps(unet, spec: DdpmFeaturesSpec) -> list[MapRef]:
    maps = available_maps(unet, spec.side)
    strides = sorted({m.stride for m in maps})
    chosen = []
    for r in spec.resolutions:
        at = [m for m in maps if m.stride == r]
        if not at:
            raise ConfigError(
                f"ddpm.features.resolutions: 1/{r} is not a {spec.side} resolution of this UNet "
                f"(available: {', '.join('1/' + str(s) for s in strides)})"
            )
        if spec.maps is not None:
            bad = [k for k in spec.maps if k >= len(at)]
            if bad:
                raise ConfigError(f"ddpm.features.maps: map {bad[0]} does not exist at 1/{r} ({len(at)} maps there)")
            at = [at[k] for k in spec.maps]
        chosen.extend(at)
    # execution order, so that early exit stops after the last one
    order = {(m.block, m.layer): i for i, m in enumerate(maps)}
    return sorted(chosen, key=lambda m: order[(m.block, m.layer)])


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


class DdpmEncoder(torch.nn.Module):
    def __init__(self, unet, schedule: NoiseScheduleSpec, features: DdpmFeaturesSpec, weights_id: str,
                 fresh_seed: int = 0):
        super().__init__()
        from rsseg.pretrain.ddpm import build_scheduler, signal_scale

        self.unet = unet
        self.spec = features
        self.scheduler = build_scheduler(schedule)
        self.timesteps = list(features.timesteps)
        self.maps = select_maps(unet, features)
        self._last = self.maps[-1]
        self.feature_info = [
            FeatureInfo(m.channels, m.stride, group=m.name, name=f"{m.name}@t{t}")
            for t in self.timesteps for m in self.maps
        ]
        self.signal_scales = {t: signal_scale(self.scheduler, t) for t in self.timesteps}
        self.weights_id = weights_id
        self._fresh = torch.Generator().manual_seed(fresh_seed)
        self.frozen = False

    # -- contract ---------------------------------------------------------------------------
    @property
    def cache_id(self) -> str | None:
        if self.spec.noise != "fixed" or not self.frozen:
            return None
        return fingerprint({"weights": self.weights_id, "side": self.spec.side, "noise_seed": self.spec.noise_seed})

    def freeze(self) -> "DdpmEncoder":
        freeze(self.unet)
        self.frozen = True
        return self

    def noise(self, shape: torch.Size, keys: Sequence[str] | None, variants: Sequence[int] | None, t: int) -> torch.Tensor:
        """(B, C, H, W) noise: seeded per (noise seed, tile, variant, t) when fixed, fresh otherwise."""
        b = shape[0]
        if self.spec.noise == "fresh":
            return torch.randn(shape, generator=self._fresh)
        keys = keys if keys is not None else [f"batch-pos-{i}" for i in range(b)]
        variants = variants if variants is not None else [0] * b
        return torch.stack([
            torch.randn(shape[1:], generator=torch.Generator().manual_seed(_seed_of(self.spec.noise_seed, k, v, t)))
            for k, v in zip(keys, variants)
        ])

    def noised(self, x: torch.Tensor, keys=None, variants=None) -> tuple[torch.Tensor, torch.Tensor]:
        """All (t, image) pairs t-major: ((T * B, C, H, W) inputs, (T * B,) timesteps)."""
        from rsseg.pretrain.ddpm import add_noise

        xs, ts = [], []
        for t in self.timesteps:
            if t == 0:
                xs.append(x.float())
            else:
                eps = self.noise(x.shape, keys, variants, t).to(x.device)
                xs.append(add_noise(self.scheduler, x, eps, torch.full((x.shape[0],), t, dtype=torch.long)))
            ts.append(torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        return torch.cat(xs), torch.cat(ts)

    def forward(self, x: torch.Tensor, keys: Sequence[str] | None = None, variants: Sequence[int] | None = None) -> list[torch.Tensor]:
        b = x.shape[0]
        xt, tt = self.noised(x, keys, variants)
        maps = self.extract(xt.to(self.unet.dtype), tt)
        out = []
        for i in range(len(self.timesteps)):
            out.extend(m[i * b : (i + 1) * b] for m in maps)
        return out

    # -- the explicit, early-exit forward ---------------------------------------------------
    def extract(self, sample: torch.Tensor, timesteps: torch.Tensor, full: bool = False):
        """The maps in ``self.maps`` order. With ``full`` the whole network runs and its output
        (what ``unet(sample, t).sample`` returns) is appended: tests compare the two paths."""
        unet = self.unet
        wanted = {(m.block, m.layer) for m in self.maps}
        found: dict[tuple[int, int], torch.Tensor] = {}
        done = lambda: len(found) == len(wanted) and not full  # noqa: E731

        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        t_emb = unet.time_proj(timesteps).to(dtype=unet.dtype)
        emb = unet.time_embedding(t_emb)
        sample = unet.conv_in(sample)
        res = (sample,)
        decoder = self.spec.side == "decoder"
        for i, down in enumerate(unet.down_blocks):
            sample, r = down(hidden_states=sample, temb=emb)
            if not decoder:
                for j in range(len(down.resnets)):
                    if (i, j) in wanted:
                        found[(i, j)] = r[j]
                if done():
                    return [found[(m.block, m.layer)] for m in self.maps]
            res += r
        if unet.mid_block is not None:
            sample = unet.mid_block(sample, emb)
        for i, up in enumerate(unet.up_blocks):
            skips = res[-len(up.resnets):]
            res = res[: -len(up.resnets)]
            h = sample
            attentions = getattr(up, "attentions", None)
            for j, resnet in enumerate(up.resnets):
                skip, skips = skips[-1], skips[:-1]
                h = resnet(torch.cat([h, skip], dim=1), emb)
                if attentions is not None:
                    h = attentions[j](h)
                if decoder and (i, j) in wanted:
                    found[(i, j)] = h
                    if done():
                        return [found[(m.block, m.layer)] for m in self.maps]
            if up.upsamplers is not None:
                for upsampler in up.upsamplers:
                    h = upsampler(h, temb=emb) if getattr(up, "upsample_type", "conv") == "resnet" else upsampler(h)
            sample = h
        sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
        return [found[(m.block, m.layer)] for m in self.maps] + [sample]


def load_unet_weights(unet, state: dict[str, torch.Tensor]) -> None:
    """Strict load: a DDPM checkpoint of this UNet must have exactly its keys."""
    result = unet.load_state_dict(state, strict=False)
    missing, unexpected = set(result.missing_keys), set(result.unexpected_keys)
    allowed_missing: set[str] = set()  # diffusers' UNet2DModel has no non-persistent buffers to skip
    if missing - allowed_missing or unexpected:
        raise ConfigError(
            f"DDPM checkpoint does not fit the UNet: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def build_encoder(run, pretrained) -> DdpmEncoder:
    """The DDPM encoder of a run: the pre-trained UNet (EMA or raw weights), or its random init."""
    from rsseg.pretrain.ddpm import build_unet_from_config
    from rsseg.pretrain.unet import min_input_multiple, unet_config

    f = run.ddpm.features
    if f.weights == "random":
        from rsseg.data import registry

        scenes = registry.scenes(run.data)
        from rsseg.data.scenes import raster_meta

        channels = len(scenes.bands) if scenes.bands else raster_meta(scenes.labelled[0].image).count
        cfg = unet_config(run.ddpm.unet.preset, run.ddpm.unet.overrides, in_channels=channels, sample_size=run.data.tile_size)
        torch.manual_seed(run.pretrain.seed)
        unet = build_unet_from_config(cfg)
        weights_id = fingerprint({"random": cfg, "seed": run.pretrain.seed})
    else:
        state = pretrained.load()
        cfg = state["objective"]["unet"]
        unet = build_unet_from_config(cfg)
        if f.weights == "ema":
            if state.get("ema") is None:
                raise ConfigError("ddpm.features.weights: ema requested but the pre-training kept no EMA (pretrain.ema.enabled: false)")
            load_unet_weights(unet, {k: v.to(unet.dtype) for k, v in state["ema"]["shadow"].items()})
        else:
            load_unet_weights(unet, state["model"])
        weights_id = f"{pretrained.fingerprint}:{f.weights}"
    multiple = min_input_multiple(cfg)
    if run.data.tile_size % multiple:
        raise ConfigError(f"data.tile_size: {run.data.tile_size} is not divisible by {multiple}, which this UNet's {len(cfg['block_out_channels'])} levels need")
    return DdpmEncoder(unet, run.ddpm.schedule, f, weights_id, fresh_seed=run.seed)
