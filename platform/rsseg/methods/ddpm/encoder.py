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

from rsseg.encoders import FeatureInfo, freeze
from rsseg.errors import ConfigError
from rsseg.methods.ddpm.noise import ForwardProcess, timesteps_outside
from rsseg.methods.ddpm.spec import DdpmFeaturesSpec, NoiseScheduleSpec
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
            bad = [k for k in spec.maps if not -len(at) <= k < len(at)]
            if bad:
                raise ConfigError(f"ddpm.features.maps: map {bad[0]} does not exist at 1/{r} ({len(at)} maps there)")
            at = [at[k] for k in spec.maps]  # negative indices count from the last map of the level
        chosen.extend(at)
    # execution order, so that early exit stops after the last one
    order = {(m.block, m.layer): i for i, m in enumerate(maps)}
    return sorted(chosen, key=lambda m: order[(m.block, m.layer)])


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


class DdpmEncoder(torch.nn.Module):
    def __init__(self, unet, schedule: NoiseScheduleSpec, features: DdpmFeaturesSpec, weights_id: str,
                 fresh_seed: int = 0, conditioning: str = "timestep"):
        super().__init__()
        self.unet = unet
        self.spec = features
        self.process = ForwardProcess(schedule, conditioning)
        outside = timesteps_outside(features.timesteps, schedule.train_steps, conditioning)
        if outside:
            raise ConfigError(f"ddpm.features.timesteps: {outside}")
        self.timesteps = list(features.timesteps)
        self.maps = select_maps(unet, features)
        self.feature_info = [
            FeatureInfo(m.channels, m.stride, group=m.name, name=f"{m.name}@t{t}", part=f"t{t}")
            for t in self.timesteps for m in self.maps
        ]
        self.signal_scales = {t: self.process.signal(t) for t in self.timesteps}
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

    def noised(self, x: torch.Tensor, keys=None, variants=None, timesteps: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All (t, image) pairs t-major: ((T * B, C, H, W) inputs, (T * B,) conditioning values:
        the timesteps, or the noise levels sqrt(abar_t) of an SR3-conditioned UNet)."""
        b = x.shape[0]
        xs, cs = [], []
        for t in timesteps if timesteps is not None else self.timesteps:
            t_vec = torch.full((b,), t, dtype=torch.long, device=x.device)
            if t == 0:  # the clean image; its conditioning is t = 0 or the noise level 1
                xs.append(x.float())
                cs.append(t_vec if self.process.conditioning == "timestep" else torch.ones(b, device=x.device))
            else:
                eps = self.noise(x.shape, keys, variants, t).to(x.device)
                xt, cond = self.process.noised(x, eps, t_vec)
                xs.append(xt)
                cs.append(cond)
        return torch.cat(xs), torch.cat(cs)

    def forward(self, x: torch.Tensor, keys: Sequence[str] | None = None, variants: Sequence[int] | None = None,
                parts: Sequence[str] | None = None) -> list[torch.Tensor]:
        """The maps of every timestep (or of those ``parts`` = ``t<t>`` name), t-major as in
        ``feature_info``: all timesteps of a batch in one forward ((T * B, ...) inputs)."""
        b = x.shape[0]
        timesteps = self.timesteps if parts is None else [t for t in self.timesteps if f"t{t}" in set(parts)]
        xt, tt = self.noised(x, keys, variants, timesteps)
        maps = self.extract(xt.to(self.unet.dtype), tt)
        out = []
        for i in range(len(timesteps)):
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


def check_schedule(run, state: dict, source: str) -> None:
    """The schedule the weights were trained with must be the run's: timestep numbers (and the
    noise the features see) only mean what they mean under it."""
    from rsseg.methods.ddpm.noise import schedules_match
    from rsseg.methods.ddpm.spec import NoiseScheduleSpec

    stored = state["objective"]["schedule"]
    if not schedules_match(stored, run.ddpm.schedule):
        theirs, ours = NoiseScheduleSpec(**{k: v for k, v in stored.items() if k != "preset"}), run.ddpm.schedule
        raise ConfigError(
            f"ddpm.schedule: {source} were trained with a {theirs.kind} schedule {theirs.beta_start:g} -> {theirs.beta_end:g} over "
            f"{theirs.train_steps} steps, this run has {ours.kind} {ours.beta_start:g} -> {ours.beta_end:g} over {ours.train_steps}; "
            "set ddpm.schedule to theirs (e.g. --set ddpm.schedule.preset=ddpm_cd)")


def build_encoder(run, pretrained) -> DdpmEncoder:
    """The DDPM encoder of a run: its pre-trained UNet (EMA or raw weights), imported weights by
    name, or the UNet's seeded random init."""
    from rsseg.methods.ddpm.unet import build_unet, conditioning_of, min_input_multiple, unet_config
    from rsseg.methods.ddpm.weights import unet_weights

    f = run.ddpm.features
    if f.weights == "random":
        from rsseg.data.registry import input_bands

        cfg = unet_config(run.ddpm.unet.preset, run.ddpm.unet.overrides, in_channels=input_bands(run.data),
                          sample_size=run.data.tile_size)
        # the run's seed (not pretrain.seed, which no pre-training uses here): the seeds of a
        # random-weights reference then vary its UNet as well as its head
        torch.manual_seed(run.seed)
        unet = build_unet(cfg)
        weights_id = fingerprint({"random": cfg, "seed": run.seed})
    else:
        if f.imported:
            from rsseg.checkpoints.store import imported

            pretrained = imported(f.imported)
        state = pretrained.load()
        if f.imported:
            check_schedule(run, state, f"the imported weights {f.imported!r}")
        cfg = state["objective"]["unet"]
        unet = build_unet(cfg)
        unet_weights(unet, state, "raw" if f.imported else f.weights)
        weights_id = f"{pretrained.fingerprint}:{f.weights}"
    multiple = min_input_multiple(cfg)
    if run.data.tile_size % multiple:
        raise ConfigError(f"data.tile_size: {run.data.tile_size} is not divisible by {multiple}, which this UNet's {len(cfg['block_out_channels'])} levels need")
    return DdpmEncoder(unet, run.ddpm.schedule, f, weights_id, fresh_seed=run.seed, conditioning=conditioning_of(cfg))


def skeleton(run, in_channels: int) -> DdpmEncoder:
    """The run's encoder with untrained weights (the caller builds it on the meta device)."""
    from rsseg.methods.ddpm.rules import network
    from rsseg.methods.ddpm.unet import build_unet, conditioning_of

    cfg = network(run, in_channels)
    return DdpmEncoder(build_unet(cfg), run.ddpm.schedule, run.ddpm.features, "skeleton", conditioning=conditioning_of(cfg))
