"""What a pre-training's result depends on, and its fingerprint (the store's key).

A pre-training is identified by what it learns from and how: the method and its pre-training
options (`Method.pretrain_keys`), the iterations of each phase, batch size, seed, EMA, the
imagery (dataset identity, archive, homogeneous splits) — not by how it runs (workers, GPU,
checkpoint interval). Sweeps that need the same pre-training share its checkpoint.
"""

from __future__ import annotations

from typing import Any

from rsseg.provenance import fingerprint as hash_of

STORE_VERSION = 1


def identity(run) -> dict[str, Any]:
    method = run.plugin
    block = run.method_block.model_dump(mode="json") if run.method_block is not None else {}
    out = {
        "v": STORE_VERSION,
        "method": method.name,
        "objective": {k: block[k] for k in method.pretrain_keys if k in block},
        "pretrain": run.pretrain.model_dump(mode="json", exclude={"runtime", "init"}) | {
            "iterations": list(run.pretrain.iterations.counts())
        },
        "data": run.data.identity(),
    }
    if run.pretrain.init:
        # the starting weights' content, not their name (a name could be bound to other weights)
        from rsseg.pretrain.store import imported_fingerprint
        from rsseg.workdir import Workdir

        out["init"] = imported_fingerprint(Workdir.resolve(), run.pretrain.init) or f"missing:{run.pretrain.init}"
    return out


def fingerprint(run) -> str:
    return hash_of(identity(run))
