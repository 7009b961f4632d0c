"""FLOPs of one unit of each stage's work, for a run's own networks, counted with torch's FLOP
counter on the meta device (exact for the counted ops, machine-independent, nothing allocated).

Units (what the sweep's work counts count, `rsseg.sweep.cost`):

- ``pretrain``   one training image: the objective's loss forward + backward;
- ``extraction`` one (tile, timestep) pass of the frozen encoder (early exit included, as it runs);
- ``finetune``   one training sample: head (+ neck) forward + backward, plus the encoder's forward
  + backward when it is fine-tuned (a frozen encoder's passes are ``extraction``);
- ``evaluation`` one evaluated tile: head forward, plus the encoder's forward when it is
  fine-tuned (no cache then).

Optimiser updates and data movement are not FLOPs and are not counted; measured rates
(`bench/gpu_check.py`) include them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STAGES = ("pretrain", "extraction", "finetune", "evaluation")


@dataclass(frozen=True)
class UnitFlops:
    """A fine-tuning run's FLOPs per unit of its stages (its pre-training: `pretrain_flops`)."""

    extraction: float
    finetune: float
    evaluation: float


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _images(run, bands: int, batch: int = 1) -> torch.Tensor:
    t = run.data.tile_size
    return torch.zeros(batch, bands, t, t, device="meta")


# Counted on a batch of 2 and halved: BatchNorm in training mode refuses a batch of one 1 x 1 map
# (UPerNet's pooling branch); everything counted is linear in the batch.
BATCH = 2


def pretrain_flops(run, bands: int) -> float | None:
    """Forward + backward of the pre-training loss for one image."""
    if run.plugin.objective is None:
        return None
    with torch.device("meta"):
        objective = run.plugin.build_objective(run, bands)

    def step():
        loss, _ = objective.loss(objective.network, _images(run, bands, BATCH), torch.Generator().manual_seed(0))
        loss.backward()

    return _count(step) / BATCH


def _networks(run, bands: int, classes: int, head: str):
    """(encoder, head with its neck) of the run, untrained, on the meta device."""
    from rsseg.heads import NeckHead

    encoder, neck, head_net = run.plugin.skeletons(run, bands, classes, head)
    return encoder, (NeckHead(neck, head_net) if neck is not None else head_net)


def unit_flops(run, bands: int, classes: int, head: str) -> UnitFlops:
    """FLOPs per unit of each stage for ``run`` (see the module docstring)."""
    from rsseg.encoders import parts_of

    encoder, head = _networks(run, bands, classes, head)
    x = _images(run, bands, BATCH)
    keys, variants = [f"tile{i}" for i in range(BATCH)], [0] * BATCH
    size = tuple(x.shape[-2:])
    passes = max(1, len(parts_of(encoder.feature_info))) if run.method == "ddpm" else 1
    mask = torch.zeros(BATCH, *size, dtype=torch.long, device="meta")

    with torch.no_grad():
        encode = _count(lambda: encoder(x, keys, variants))
    features = None

    def head_forward():
        nonlocal features
        with torch.no_grad():
            features = encoder(x, keys, variants)
        return _count(lambda: head(features, size))

    head_fwd = head_forward()

    def head_step():
        logits = head(features, size)
        head.loss(features, logits, mask).backward()

    head_train = _count(head_step)
    if run.finetune.frozen:
        finetune, evaluation = head_train, head_fwd
    else:
        def full_step():
            feats = encoder(x, keys, variants)
            head.loss(feats, head(feats, size), mask).backward()

        finetune, evaluation = _count(full_step), head_fwd + encode
    return UnitFlops(encode / passes / BATCH, finetune / BATCH, evaluation / BATCH)
