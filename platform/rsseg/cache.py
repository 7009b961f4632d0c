"""Content-addressed feature cache: frozen encoder + fixed noise => features are a pure function
of (encoder fingerprint, part, noise seed, tile, augmentation variant).

A *part* is the set of maps one forward computes on its own (`FeatureInfo.part`): one timestep
of the DDPM, the whole network of the other encoders. Files:
``<workdir>/cache/features/<cache_id>/<part>/<tile>~v<variant>.npz``, every map of that
(tile, part) in one file, float16 at native resolution, so every run and sweep trial that needs
the same key shares it and a tile computes only the parts it lacks (forwards of a fixed
``FORWARD_TILES`` tiles of one part, so that a stored value does not depend on what else was missing).
``cache_id`` (`cache_key`) covers what the encoder says its features depend on (its own
``cache_id``: the pre-training fingerprint, the weights (EMA / raw), the side and the noise seed),
which maps a part stores (the map groups of ``feature_info``, not the timesteps: a timestep is a
part of its own and is shared by every run that uses it), the arithmetic that computed them
(bf16 autocast on a GPU, float32 on a CPU) and the version of the feature code.

Writes are a temporary file renamed onto the final name, without fsync: a reader sees the whole
file or none, and a file left empty or torn by a power loss fails to load, which reads as a miss
and is recomputed — for a cache that is enough, and it makes a cold write as cheap as the rename.

Concurrent trials never compute the same key: a (tile, part) is *claimed* first (a ``.claim``
file created with O_EXCL, holding the claimant's host and pid). Whoever holds the claim computes
and writes; the others wait for the file. A claim whose process is gone (same host) or older than
``STALE_CLAIM_S`` is taken over. When the claimant cannot write (over budget, disk full) it drops
the claim and a waiter computes for itself.

A size budget bounds the cache: the current size is measured once when the cache opens and
tracked as this process writes; beyond the budget nothing more is written and the missing
features are computed online, as the paper had to (60 GB for MiniFrance-S's features). Several
processes may together overshoot by at most what each wrote since it opened the cache. When a
cache opens at over 90 % of its budget, the features of *other* encoders are evicted, least
recently used first (a feature set marks its use when opened), down to half the budget, so
stale encoders do not lock a new one out; a reader that loses a file to eviction recomputes it.
Sizes are on-disk sizes (blocks). A full disk is handled like the budget: the features are
computed online and the run goes on.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rsseg.encoders import parts_of

log = logging.getLogger(__name__)
STALE_CLAIM_S = 600.0
WAIT_POLL_S = 0.05
# bump when the feature code changes what it computes for the same weights and tile
FEATURE_CODE_VERSION = 2
# Tiles per forward that fills the cache, one part each, the last group padded: a (tile, part)'s
# maps must not depend on which other tiles or parts happened to be missing with it. CPU kernels
# pick their blocking by batch size (a tile's t = 50 maps differed by up to 5e-6 between batches
# of 5 and 16 tiles, enough to flip float16 roundings), so a variable batch made a cached value
# depend on the order trials ran in. 8 = the fine-tuning batch: training batches pad nothing.
FORWARD_TILES = 8


def cache_key(encoder, compute_precision: str) -> str:
    """The cache id of an encoder's features computed with ``compute_precision`` (bf16 | fp32)."""
    from rsseg.provenance import fingerprint

    maps = sorted({(fi.group, fi.channels, fi.stride) for fi in encoder.feature_info})
    return fingerprint({"encoder": encoder.cache_id, "maps": [list(m) for m in maps], "precision": compute_precision,
                        "forward_tiles": FORWARD_TILES, "version": FEATURE_CODE_VERSION})


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


def _on_disk(path: Path) -> int:
    st = path.stat()
    return st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size


@dataclass
class CacheStats:
    hits: int = 0  # (tile, part) keys read from the cache
    misses: int = 0  # keys not in the cache when asked
    computed: int = 0  # keys this process computed (the backbone passes it paid)
    waited: int = 0  # keys another process was computing, read after it finished
    writes: int = 0
    skipped_over_budget: int = 0
    bytes_written: int = 0
    tiles_computed: int = 0  # tiles that joined a forward (any of their parts missing)

    def as_metrics(self, prefix: str = "cache/") -> dict[str, float]:
        total = self.hits + self.misses
        return {f"{prefix}hit_rate": self.hits / total if total else 0.0, f"{prefix}writes": float(self.writes),
                f"{prefix}over_budget": float(self.skipped_over_budget), f"{prefix}tiles_computed": float(self.tiles_computed),
                f"{prefix}parts_computed": float(self.computed), f"{prefix}parts_waited": float(self.waited),
                f"{prefix}parts_read": float(self.hits)}


@dataclass
class FeatureCache:
    root: Path
    budget_bytes: int
    used_bytes: int = 0
    stats: CacheStats = field(default_factory=CacheStats)
    writable: bool = True

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

    def path(self, cache_id: str, part: str, tile: str, variant: int) -> Path:
        return self.root / cache_id / _safe(part) / f"{_safe(tile)}~v{variant}.npz"

    def get(self, cache_id: str, part: str, tile: str, variant: int) -> list[torch.Tensor] | None:
        p = self.path(cache_id, part, tile, variant)
        try:
            with np.load(p) as z:
                return [torch.from_numpy(z[f"m{i}"]) for i in range(len(z.files))]
        except (FileNotFoundError, ValueError, EOFError, OSError, KeyError):
            return None  # absent, evicted, or torn by a crash: a miss

    def put(self, cache_id: str, part: str, tile: str, variant: int, maps: Sequence[torch.Tensor]) -> bool:
        arrays = {f"m{i}": m.detach().to("cpu", torch.float16).contiguous().numpy() for i, m in enumerate(maps)}
        size = sum(a.nbytes for a in arrays.values())
        if not self.writable or self.used_bytes + size > self.budget_bytes:
            self.stats.skipped_over_budget += 1
            return False
        p = self.path(cache_id, part, tile, variant)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, p)  # atomic: readers see the whole file or none (no fsync: see above)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                self.writable = False  # a full or read-only disk: compute online from now on
                self.stats.skipped_over_budget += 1
                return False
            raise
        on_disk = _on_disk(p)
        self.used_bytes += on_disk
        self.stats.writes += 1
        self.stats.bytes_written += on_disk
        return True

    # -- claims: one computation per key across processes ----------------------------------------
    def _claim_path(self, cache_id: str, part: str, tile: str, variant: int) -> Path:
        p = self.path(cache_id, part, tile, variant)
        return p.with_name(p.name + ".claim")

    def claim(self, cache_id: str, part: str, tile: str, variant: int) -> bool:
        """True when this process now holds the key (and must compute it, then `release`)."""
        if not self.writable:
            return False
        c = self._claim_path(cache_id, part, tile, variant)
        try:
            c.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(c, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if self._stale(c):
                c.unlink(missing_ok=True)
                return self.claim(cache_id, part, tile, variant)
            return False
        except OSError as exc:
            self._unwritable(exc)
            return False  # cannot even create the claim: compute online, write nothing
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        except OSError as exc:  # a full disk: the empty claim goes, and so does the cache
            c.unlink(missing_ok=True)
            self._unwritable(exc)
            return False
        return True

    def _unwritable(self, exc: OSError) -> None:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            self.writable = False  # a full or read-only disk: compute online from now on

    def release(self, cache_id: str, part: str, tile: str, variant: int) -> None:
        self._claim_path(cache_id, part, tile, variant).unlink(missing_ok=True)

    def release_all(self, cache_id: str, keys: Sequence[tuple[str, str, int]]) -> None:
        for part, tile, variant in keys:
            self.release(cache_id, part, tile, variant)

    def claimed(self, cache_id: str, part: str, tile: str, variant: int) -> bool:
        c = self._claim_path(cache_id, part, tile, variant)
        return c.exists() and not self._stale(c)

    @staticmethod
    def _stale(claim: Path) -> bool:
        try:
            age = time.time() - claim.stat().st_mtime
            owner = json.loads(claim.read_text() or "{}")
        except (OSError, ValueError):
            return False  # being written right now
        if age > STALE_CLAIM_S:
            return True
        if owner.get("host") == socket.gethostname() and owner.get("pid"):
            try:
                os.kill(int(owner["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False


class CachedEncoder:
    """Wraps an encoder whose ``cache_id`` is set: per (tile, part), the maps come from the cache,
    or — for the keys this process claims — from fixed-size forwards of exactly the missing parts,
    stored afterwards; keys another process is computing are waited for."""

    def __init__(self, encoder, cache: FeatureCache, cache_id: str | None = None):
        """``cache_id``: `cache_key` of the encoder at the run's precision (float32 when not given)."""
        if encoder.cache_id is None:
            raise ValueError("encoder features are not cacheable (trainable weights or fresh noise)")
        self.encoder = encoder
        self.cache = cache
        self.cache_id = cache_id or cache_key(encoder, "fp32")
        self.parts = parts_of(encoder.feature_info)
        self.members = {part: [i for i, fi in enumerate(encoder.feature_info) if fi.part == part] for part in self.parts}
        self.extract_s = 0.0  # seconds spent in the encoder (tiles/s of extraction)

    def _read(self, part: str, tile: str, variant: int, size: tuple[int, int]) -> list[torch.Tensor] | None:
        """The stored maps of a key, or None (a miss) when absent or not what this encoder computes:
        a file whose maps' count, shape or dtype disagrees is never used (a warning says so)."""
        maps = self.cache.get(self.cache_id, part, tile, variant)
        if maps is None:
            return None
        info = [self.encoder.feature_info[i] for i in self.members[part]]
        want = [(fi.channels, size[0] // fi.stride, size[1] // fi.stride) for fi in info]
        got = [tuple(m.shape) for m in maps]
        if got != want or any(m.dtype != torch.float16 for m in maps):
            log.warning("feature cache %s: %s of %s holds maps %s, this encoder computes %s; recomputing",
                        self.cache_id, part, tile, got, want)
            return None
        return maps

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, keys: Sequence[str], variants: Sequence[int]) -> list[torch.Tensor]:
        b = images.shape[0]
        size = tuple(images.shape[-2:])
        have: dict[tuple[int, str], list[torch.Tensor]] = {}
        for i, (k, v) in enumerate(zip(keys, variants)):
            for part in self.parts:
                maps = self._read(part, k, int(v), size)
                if maps is not None:
                    have[(i, part)] = maps
        missing = [(i, part) for i in range(b) for part in self.parts if (i, part) not in have]
        self.cache.stats.hits += len(have)
        self.cache.stats.misses += len(missing)
        claimed = [key for key in missing if self._take(key, keys, variants, size, have)]
        if not self.cache.writable:  # a full or read-only disk: the whole batch online, nothing stored
            self.cache.release_all(self.cache_id, [(p, keys[i], int(variants[i])) for i, p in claimed])
            self._compute([key for key in missing if key not in have], images, keys, variants, have, store=False)
            return self._assemble(have, b, images.device)
        self._compute(claimed, images, keys, variants, have)
        waiting = [key for key in missing if key not in have]
        while waiting:  # keys other processes are computing
            still, online = [], []
            for key in waiting:
                i, part = key
                maps = self._read(part, keys[i], int(variants[i]), size)
                if maps is not None:
                    have[key] = maps
                    self.cache.stats.waited += 1
                elif not self.cache.claimed(self.cache_id, part, keys[i], int(variants[i])):
                    # the claimant finished (written: read) or gave up without writing (over budget,
                    # full disk, died): then ours
                    if self._take(key, keys, variants, size, have):
                        self._compute([key], images, keys, variants, have)
                    elif key not in have:  # another process claimed it first: wait; an unwritable cache: online
                        (online if not self.cache.writable else still).append(key)
                else:
                    still.append(key)
            self._compute(online, images, keys, variants, have, store=False)
            waiting = still
            if waiting:
                time.sleep(WAIT_POLL_S)
        return self._assemble(have, b, images.device)

    def _take(self, key: tuple[int, str], keys, variants, size, have) -> bool:
        """Claim ``key``: True when this process must now compute it. A key written between our
        miss and the claim (its claimant finished and released it meanwhile) is read, not
        computed again: without this re-read two concurrent trials computed ~11 % of the smoke
        noise ablation's parts twice (208 computed for 185 files, once in CI)."""
        i, part = key
        if not self.cache.claim(self.cache_id, part, keys[i], int(variants[i])):
            return False
        maps = self._read(part, keys[i], int(variants[i]), size)
        if maps is None:
            return True
        self.cache.release(self.cache_id, part, keys[i], int(variants[i]))
        have[key] = maps
        self.cache.stats.waited += 1
        return False

    def _compute(self, todo: list[tuple[int, str]], images, keys, variants, have, store: bool = True) -> None:
        """Per part, its missing tiles in forwards of exactly ``FORWARD_TILES`` (the last group
        padded with copies of its first tile, whose maps are dropped). With ``store`` the keys are
        claimed by this process: written, then released (released unwritten when the forward
        fails, so that no one waits on a key nobody computes)."""
        self.cache.stats.tiles_computed += len({i for i, _ in todo})
        try:
            for part in self.parts:
                tiles = [i for i, p in todo if p == part]
                for start in range(0, len(tiles), FORWARD_TILES):
                    self._forward(part, tiles[start : start + FORWARD_TILES], images, keys, variants, have, store)
        finally:
            if store:
                for i, part in todo:
                    self.cache.release(self.cache_id, part, keys[i], int(variants[i]))

    def _forward(self, part: str, tiles: list[int], images, keys, variants, have, store: bool) -> None:
        padded = tiles + [tiles[0]] * (FORWARD_TILES - len(tiles))
        t0 = time.perf_counter()
        computed = self.encoder(images[torch.tensor(padded, device=images.device)], [keys[i] for i in padded],
                                [int(variants[i]) for i in padded], parts=[part])
        computed = [m[: len(tiles)].detach().to("cpu", torch.float16) for m in computed]
        self.extract_s += time.perf_counter() - t0
        for slot, i in enumerate(tiles):
            # what the cache would return (float16), so cached and fresh batches agree
            maps = [m[slot] for m in computed]
            have[(i, part)] = maps
            self.cache.stats.computed += 1
            if store:
                self.cache.put(self.cache_id, part, keys[i], int(variants[i]), maps)

    def _assemble(self, have, b: int, device: torch.device) -> list[torch.Tensor]:
        """The maps in feature_info order, (B, C, h, w) float32 on ``device`` — from the host in
        one copy (a flat buffer split on the device) rather than one per map."""
        index = {m: (part, j) for part in self.parts for j, m in enumerate(self.members[part])}
        stacked = [torch.stack([have[(i, index[m][0])][index[m][1]] for i in range(b)]) for m in range(len(index))]
        if device.type == "cpu":
            return [s.float() for s in stacked]
        flat = torch.cat([s.reshape(-1) for s in stacked]).pin_memory().to(device, non_blocking=True)
        out, offset = [], 0
        for s in stacked:
            out.append(flat[offset : offset + s.numel()].view(s.shape).float())
            offset += s.numel()
        return out
