"""What an MA3E run needs checked across blocks: its window and masking split against the tile."""

from __future__ import annotations

from rsseg_baselines.ma3e.windows import masking_problem, window_problem
from rsseg_baselines.vit.spec import SIZES


def check(run) -> list[tuple[str, str]]:
    """The window and the masking split against this run's tile (a field validator does not see the tile size)."""
    spec = run.ma3e
    patch = SIZES[spec.size]["patch_size"]
    grid = run.data.tile_size // patch
    if (problem := window_problem(spec.window, grid)):
        return [("ma3e.window", f"{problem}; data.tile_size {run.data.tile_size}, patch {patch}")]
    if (problem := masking_problem(grid * grid, spec.window ** 2, spec.mask_ratio, spec.window_mask_ratio)):
        return [("ma3e.window_mask_ratio", problem)]
    return []
