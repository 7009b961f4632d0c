"""Content-addressed feature cache: frozen encoder + fixed noise => features are a pure function
of (encoder fingerprint, map, timestep, noise seed, tile, augmentation variant).

Files: ``<workdir>/cache/features/<cache_id>/<map>@t<t>/<tile>~v<variant>.npy``, float16 at native
resolution, each written atomically, so every run and sweep trial that needs the same key
shares it. ``cache_id`` covers the pre-training fingerprint, the weights (EMA / raw), the side
and the noise seed.

A size budget bounds the cache: the current size is measured once when the cache opens and
tracked as this process writes; beyond the budget nothing more is written and the missing
features are computed online, as the paper had to (60 GB for MiniFrance-S's features). Several
processes may together overshoot by at most what each wrote since it opened the cache. When a
cache opens at over 90 % of its budget, the features of *other* encoders are evicted, least
recently used first (a feature set marks its use when opened), down to half the budget, so
stale encoders do not lock a new one out; a reader that loses a file to eviction recomputes it.
Sizes are on-disk sizes (blocks), which for these small files exceed their byte counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rsseg.atomic import atomic_path


def _safe(name: str) -> str:
    return name.replace("/", "__").replace(":", "_")


def directory_size(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                st = os.stat(os.path.join(dirpath, f))
                total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size  # on-disk size
            except OSError:
                pass
    return total


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    skipped_over_budget: int = 0
    bytes_written: int = 0
    tiles_computed: int = 0

    def as_metrics(self, prefix: str = "cache/") -> dict[str, float]:
        total = self.hits + self.misses
        return {f"{prefix}hit_rate": self.hits / total if total else 0.0, f"{prefix}writes": float(self.writes),
                f"{prefix}over_budget": float(self.skipped_over_budget), f"{prefix}tiles_computed": float(self.tiles_computed)}


@dataclass
class FeatureCache:
    root: Path
    budget_bytes: int
    used_bytes: int = 0
    stats: CacheStats = field(default_factory=CacheStats)

    @classmethod
    def open(cls, root: Path, budget_gb: float, current: str | None = None) -> "FeatureCache":
        """Open the cache; when over budget, evict other feature sets (least recently used first)."""
        import shutil

        root.mkdir(parents=True, exist_ok=True)
        budget = int(budget_gb * 2**30)
        if current is not None:
            (root / current).mkdir(exist_ok=True)
            (root / current / ".last_used").touch()
        used = directory_size(root)
        if used > 0.9 * budget:  # make room: evict down to half the budget
            def last_used(d: Path) -> float:
                marker = d / ".last_used"
                return marker.stat().st_mtime if marker.exists() else d.stat().st_mtime

            others = sorted((d for d in root.iterdir() if d.is_dir() and d.name != current), key=last_used)
            for d in others:
                if used <= budget // 2:
                    break
                size = directory_size(d)
                shutil.rmtree(d, ignore_errors=True)
                used -= size
        return cls(root, budget, used)

    def path(self, cache_id: str, name: str, tile: str, variant: int) -> Path:
        return self.root / cache_id / _safe(name) / f"{_safe(tile)}~v{variant}.npy"

    def get(self, cache_id: str, name: str, tile: str, variant: int) -> torch.Tensor | None:
        p = self.path(cache_id, name, tile, variant)
        try:
            return torch.from_numpy(np.load(p))
        except (FileNotFoundError, ValueError, EOFError, OSError):
            return None

    def put(self, cache_id: str, name: str, tile: str, variant: int, feature: torch.Tensor) -> bool:
        data = feature.detach().to("cpu", torch.float16).contiguous().numpy()
        if self.used_bytes + data.nbytes > self.budget_bytes:
            self.stats.skipped_over_budget += 1
            return False
        p = self.path(cache_id, name, tile, variant)
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p, suffix=".npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, data)
        st = p.stat()
        size = st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
        self.used_bytes += size
        self.stats.writes += 1
        self.stats.bytes_written += size
        return True


class CachedEncoder:
    """Wraps an encoder whose ``cache_id`` is set: per tile, every map comes from the cache or
    the tile joins one batched forward of the misses, whose maps are then stored."""

    def __init__(self, encoder, cache: FeatureCache):
        if encoder.cache_id is None:
            raise ValueError("encoder features are not cacheable (trainable weights or fresh noise)")
        self.encoder = encoder
        self.cache = cache
        self.cache_id = encoder.cache_id
        self.names = [fi.name for fi in encoder.feature_info]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, keys: Sequence[str], variants: Sequence[int]) -> list[torch.Tensor]:
        b = images.shape[0]
        per_tile: list[list[torch.Tensor] | None] = []
        for k, v in zip(keys, variants):
            maps = []
            for name in self.names:
                f = self.cache.get(self.cache_id, name, k, int(v))
                if f is None:
                    maps = None
                    break
                maps.append(f)
            per_tile.append(maps)
        missing = [i for i in range(b) if per_tile[i] is None]
        self.cache.stats.hits += b - len(missing)
        self.cache.stats.misses += len(missing)
        if missing:
            idx = torch.tensor(missing)
            computed = self.encoder(images[idx], [keys[i] for i in missing], [int(variants[i]) for i in missing])
            self.cache.stats.tiles_computed += len(missing)
            for slot, i in enumerate(missing):
                maps = [m[slot] for m in computed]
                for name, f in zip(self.names, maps):
                    self.cache.put(self.cache_id, name, keys[i], int(variants[i]), f)
                # use what the cache would return (float16) so cached and fresh batches agree
                per_tile[i] = [f.to(torch.float16) for f in maps]
        device = images.device
        return [torch.stack([per_tile[i][m] for i in range(b)]).to(device, torch.float32) for m in range(len(self.names))]
