"""The ``ddpm:`` block of a run spec: the UNet, the noise schedule, the optimiser of the DDPM
pre-training and which features the frozen UNet gives the segmentor."""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rsseg.config.specs import OptimSpec, Strict
from rsseg.methods.ddpm.unet import PRESETS, UNET_ARGS


class UNetSpec(Strict):
    preset: str = Field("sr3", description="tiny | ho256 | sr3")
    overrides: dict[str, Any] = Field(default_factory=dict, description="UNet2DModel arguments over the preset")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown UNet preset {v!r}; expected one of {', '.join(PRESETS)}")
        return v

    @field_validator("overrides")
    @classmethod
    def _known_overrides(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(UNET_ARGS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], UNET_ARGS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown UNet2DModel argument {unknown[0]!r}{hint}")
        return v


# Named schedules: ``ddpm`` is Ho et al.'s (1000 steps, 1e-4 -> 0.02), ``ddpm_cd`` DDPM-CD's
# (config/ddpm_train.json: linear 1e-6 -> 1e-2 over 2000 steps), the paper's.
SCHEDULE_PRESETS: dict[str, dict[str, Any]] = {
    "ddpm": {"kind": "linear", "train_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
    "ddpm_cd": {"kind": "linear", "train_steps": 2000, "beta_start": 1e-6, "beta_end": 1e-2},
}


class NoiseScheduleSpec(Strict):
    preset: Literal["ddpm", "ddpm_cd"] | None = Field(None, description="a named schedule; the fields below override it")
    kind: Literal["linear", "cosine"] = "linear"
    train_steps: int = Field(1000, ge=2)
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in SCHEDULE_PRESETS:
            return {**SCHEDULE_PRESETS[data["preset"]], **data}
        return data


class DdpmFeaturesSpec(Strict):
    side: Literal["decoder", "encoder"] = "decoder"
    resolutions: list[int] = Field([16, 8, 4, 2], description="feature strides: 16 means H/16")
    maps: list[int] | None = Field(None, description="which maps per resolution (0-based, -1 = the last); default all")
    timesteps: list[int] = Field([50, 100, 150], description="noise levels; 0 = the clean image")
    noise: Literal["fixed", "fresh"] = Field("fixed", description="fixed: seeded per (tile, t), cacheable; fresh: new each call")
    noise_seed: int = 0
    weights: str = Field("ema", description="ema | raw (this run's pre-training) | random (the UNet's seeded init, an ablation) | "
                                            "the name of imported weights (`platform weights list`): frozen features straight from them")

    @field_validator("resolutions")
    @classmethod
    def _resolutions(cls, v: list[int]) -> list[int]:
        if not v or any(r < 1 or r & (r - 1) for r in v) or len(set(v)) != len(v):
            raise ValueError(f"expected distinct powers of two such as [16, 8, 4, 2], got {v}")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        import re

        if v not in ("ema", "raw", "random") and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", v):
            raise ValueError(f"expected ema, raw, random or the name of imported weights, got {v!r}")
        return v

    @property
    def imported(self) -> str | None:
        """The imported weights' name, when the features come from them."""
        return None if self.weights in ("ema", "raw", "random") else self.weights

    @field_validator("timesteps")
    @classmethod
    def _timesteps(cls, v: list[int]) -> list[int]:
        if not v or any(t < 0 for t in v) or len(set(v)) != len(v):
            raise ValueError(f"expected distinct non-negative timesteps such as [50, 100, 150], got {v}")
        return v


class DdpmSpec(Strict):
    unet: UNetSpec = UNetSpec()
    schedule: NoiseScheduleSpec = NoiseScheduleSpec()
    optim: OptimSpec = OptimSpec()
    features: DdpmFeaturesSpec = DdpmFeaturesSpec()
