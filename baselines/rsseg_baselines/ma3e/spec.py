"""The ``ma3e:`` block of a run spec: MAE's plus the window, the angles and the masking split."""

from __future__ import annotations

from pydantic import Field

from rsseg_baselines.vit.spec import MaeSpec


class Ma3eSpec(MaeSpec):
    norm_pix_loss: bool = Field(False, description="the release trains on raw pixels (the OT cost normalises patches itself)")
    window: int = Field(6, ge=1, description="side of the rotated crop in patches (the release: 96 px at patch 16 on 224 px tiles)")
    angle_range: float = Field(45.0, ge=0, le=180, description="rotation angle drawn uniformly from [-angle_range, angle_range] degrees")
    window_mask_ratio: float = Field(0.75, gt=0, lt=1, description="share of the window's patches masked (mask_ratio: the background's)")
    sinkhorn_eps: float = Field(0.1, gt=0, description="entropic regularisation of the OT plan")
    sinkhorn_iterations: int = Field(100, ge=1)
    weights: None = Field(None, description="no importer for MA3E's release yet: MA3E is pre-trained here")
