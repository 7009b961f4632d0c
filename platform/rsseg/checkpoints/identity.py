"""What a pre-training's result depends on, and its fingerprint (the store's key).

A pre-training is identified by what it learns from and how: the method and its pre-training
options (`Method.pretrain_keys`), the iterations of each phase, batch size, seed, EMA, the
imagery — not by how it runs (workers, GPU, checkpoint interval). Sweeps that need the same
pre-training share its checkpoint.

**Trunks.** The archive phase of a two-step run depends only on the archive imagery, the network,
its optimiser and schedule, batch, seed and EMA — not on the target dataset nor on when the run
switches to homogeneous imagery — and every step is a pure function of the step number (data
order, augmentation, noise, learning rate; `rsseg.pretrain.schedule`). So the archive phases of
all runs with one ``trunk`` fingerprint are prefixes of one another: a run switching at step k
starts from the trunk's checkpoint at step k (bit-identical to training those k steps itself) and
trains only its homogeneous phase. Its fingerprint is then (trunk, switch step, homogeneous
phase): an archive-only run is the trunk at its length, whatever the target dataset. This needs a
learning rate that does not depend on the total (constant after warm-up); a cosine schedule is
not a prefix of a longer one, and such runs keep a fingerprint of their own (`lineage` says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rsseg.provenance import fingerprint as hash_of

STORE_VERSION = 2


@dataclass(frozen=True)
class Lineage:
    """Where a pre-training sits in its trunk: ``trunk`` None = trained on its own (``why``)."""

    trunk: str | None
    switch: int  # the last archive step (= the archive iterations)
    homogeneous: int  # iterations after the switch
    why: str | None = None


def _objective(run) -> dict[str, Any]:
    block = run.method_block.model_dump(mode="json") if run.method_block is not None else {}
    return {k: block[k] for k in run.plugin.pretrain_keys if k in block}


def _init(run) -> dict[str, Any]:
    if not run.pretrain.init:
        return {}
    # the starting weights' content, not their name (a name could be bound to other weights)
    from rsseg.checkpoints.store import imported_fingerprint
    from rsseg.workdir import Workdir

    return {"init": imported_fingerprint(Workdir.resolve(), run.pretrain.init) or f"missing:{run.pretrain.init}"}


def trunk_identity(run) -> dict[str, Any]:
    """What the archive phase depends on (not the target dataset, not the iteration counts)."""
    p, d = run.pretrain, run.data
    out = {
        "v": STORE_VERSION, "method": run.plugin.name, "objective": _objective(run),
        "batch_size": p.batch_size, "seed": p.seed, "ema": p.ema.model_dump(mode="json"),
        "archive": p.archive.model_dump(mode="json"),
        "tiling": {"tile_size": d.tile_size, "stride": d.stride, "min_valid_fraction": d.min_valid_fraction, "bands": d.bands},
        "in_bands": d.declared_bands, **_init(run),
    }
    if run.pretrain.archive.source_for(run.data) == "synthetic":  # the archive scenes' generator inputs (not the labelled scenes')
        from rsseg.config.specs import SyntheticSpec

        syn = d.synthetic if d.dataset == "synthetic" else SyntheticSpec()
        out["archive_domain"] = {k: getattr(syn, k) for k in ("seed", "size", "texture_scale", "gsd", "archive_scenes")}
    if out["in_bands"] is None:  # the network's input width is only known from the target's rasters
        out["target"] = d.identity()
    return out


def not_shareable(run) -> str | None:
    """Why this run's archive phase cannot come from a shared trunk (None: it can)."""
    archive, _ = run.pretrain.iterations.counts()
    if archive == 0:
        return "no archive phase"
    optim = getattr(run.method_block, "optim", None)
    if optim is None or not hasattr(optim, "after_warmup"):
        return f"the {run.method} objective has no step-wise learning-rate schedule to compare"
    if optim.after_warmup != "constant":
        return (f"{run.plugin.block}.optim.after_warmup: {optim.after_warmup} ties the learning rate to the total iterations, "
                "so a shorter run is not a prefix of a longer one")
    return None


def lineage(run) -> Lineage:
    archive, homogeneous = run.pretrain.iterations.counts()
    why = not_shareable(run)
    return Lineage(None if why else hash_of(trunk_identity(run)), archive, homogeneous, why)


def homogeneous_identity(run) -> dict[str, Any]:
    source = run.pretrain.homogeneous_data or run.data
    return {"iterations": run.pretrain.iterations.counts()[1], "data": source.identity(), "splits": list(run.pretrain.homogeneous),
            "other_source": run.pretrain.homogeneous_data is not None}


def identity(run) -> dict[str, Any]:
    lin = lineage(run)
    if lin.trunk is not None:
        out: dict[str, Any] = {"v": STORE_VERSION, "trunk": lin.trunk, "switch": lin.switch}
        if lin.homogeneous:
            out["homogeneous"] = homogeneous_identity(run)
        return out
    return {
        "v": STORE_VERSION, "method": run.plugin.name, "objective": _objective(run),
        "pretrain": run.pretrain.model_dump(mode="json", exclude={"runtime", "init", "homogeneous_data"}) | {
            "iterations": list(run.pretrain.iterations.counts())},
        "data": run.data.identity(), **_init(run),
        **({"homogeneous_data": run.pretrain.homogeneous_data.identity()} if run.pretrain.homogeneous_data is not None else {}),
    }


def fingerprint(run) -> str:
    return hash_of(identity(run))
