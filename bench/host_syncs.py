"""Host synchronisations per training step, counted by the simulated CUDA device (tests/simcuda.py):
each ``.item()`` / ``float()`` / ``bool()`` of a device tensor, copy to the host, data-dependent
output size or ``torch.cuda.synchronize`` makes the host wait for the GPU, which then idles until
the host queues more work. Counted through the real Trainer and fine-tuning loop with
``runtime.device: cuda`` (bf16), per call site, and appended to docs/benchmarks.md.

    python bench/host_syncs.py [--no-append]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import simcuda  # noqa: E402
from common import append  # noqa: E402

STEPS, LOG_EVERY = 12, 4


def run_spec(**over):
    from rsseg.config.loader import merge
    from rsseg.runspec import RunSpec

    base = {"runtime": {"device": "cuda"},
            "data": {"tile_size": 32, "synthetic": {"scenes": 3, "size": 128, "unlabeled_scenes": 1, "archive_scenes": 1}},
            "ddpm": {"unet": {"preset": "sr3", "overrides": {"block_out_channels": [32, 32, 64, 64, 64]}}, "schedule": {"preset": "ddpm_cd"},
                     "optim": {"warmup_iterations": 2}, "features": {"timesteps": [50, 100, 150], "maps": [-1]}},
            "pretrain": {"iterations": {"archive": 0, "homogeneous": STEPS}, "batch_size": 4,
                         "runtime": {"workers": 1, "checkpoint_every": 10**6, "log_every": LOG_EVERY, "samples": 0}},
            "finetune": {"iterations": STEPS + 1, "eval_every": 1000, "batch_size": 4, "mlp": {"fuse_hidden": 64},
                         "augment": {"stretch": False}}}
    return RunSpec(**merge(base, over))


def per_step(counts: list[Counter]) -> tuple[float, Counter]:
    total = Counter()
    for c in counts:
        total += c
    return sum(total.values()) / max(len(counts), 1), total


def pretraining(wd) -> tuple[list[int], Counter]:
    from rsseg.checkpoints import store
    from rsseg.pretrain.trainer import LocalGroup, Trainer, TrainPlan

    run = run_spec()
    sdir = store.StoreDir.for_run(run, wd)
    plan = TrainPlan(fingerprint=run.pretrain_fingerprint, store_root=str(sdir.root), workdir=str(wd.root), run=run,
                     in_channels=3, counts=run.pretrain.iterations.counts(), tracking_uri="", mlflow_run_id="", stop_after=STEPS - 1)
    counts: list[Counter] = []
    with simcuda.simulated_cuda() as sim:
        trainer = Trainer(plan, 0, 1, torch.device("cuda", 0), group=LocalGroup())
        step, after = trainer.step, trainer.after_step
        marks = []
        trainer.step = lambda *a: marks.append(sim.syncs.sites.copy()) or step(*a)
        trainer.after_step = lambda *a: after(*a) or counts.append(sim.syncs.since(marks[-1]))
        trainer.fit()
    # the last step (STEPS - 1, the stop) writes a checkpoint: its host copies are not a step's
    return [sum(c.values()) for c in counts[:-1]], sum(counts[:-1], Counter())


def finetuning(wd, pretrained, **finetune) -> tuple[list[int], Counter]:
    from rsseg import finetune as ft

    run = run_spec(finetune=finetune)
    counts: list[Counter] = []
    original = ft.Finetuner.train_step

    def counted(self, it, batch):
        before = simcuda.STATE.syncs.sites.copy()
        original(self, it, batch)
        counts.append(simcuda.STATE.syncs.since(before))

    ft.Finetuner.train_step = counted
    try:
        with simcuda.simulated_cuda():
            if finetune.get("frozen", True) and finetune.get("cache", {}).get("enabled", True):
                ft.run(run, wd, pretrained=pretrained)  # warms the feature cache
                counts.clear()
            ft.run(run, wd, pretrained=pretrained)
    finally:
        ft.Finetuner.train_step = original
    return [sum(c.values()) for c in counts], sum(counts, Counter())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from rsseg.checkpoints import store
    from rsseg.pretrain.trainer import Trainer, TrainPlan
    from rsseg.workdir import Workdir

    wd = Workdir.resolve(tempfile.mkdtemp(prefix="rsseg-syncs-")).ensure()
    rows = {"pre-training step (sr3, bf16, EMA)": pretraining(wd)}
    cpu = run_spec(runtime={"device": "cpu"}, pretrain={"runtime": {"checkpoint_every": STEPS, "log_every": LOG_EVERY, "samples": 0}})
    sdir = store.StoreDir.for_run(cpu, wd)
    Trainer(TrainPlan(fingerprint=cpu.pretrain_fingerprint, store_root=str(sdir.root), workdir=str(wd.root), run=cpu,
                      in_channels=3, counts=cpu.pretrain.iterations.counts(), tracking_uri="", mlflow_run_id=""), 0, 1,
            torch.device("cpu")).fit()
    pretrained = store.find(cpu, wd)
    rows["fine-tuning step, frozen, warm feature cache"] = finetuning(wd, pretrained)
    rows["fine-tuning step, frozen, features online (no cache)"] = finetuning(wd, pretrained, cache={"enabled": False})
    rows["fine-tuning step, encoder trained"] = finetuning(wd, pretrained, frozen=False)
    lines = [f"Counted by the simulated CUDA device (tests/simcuda.py) through the real loops, `runtime.device: cuda`, {STEPS - 1} "
             f"steps each, flushing every {LOG_EVERY} pre-training steps and every "
             "50 fine-tuning steps or at validation; steps that write a checkpoint are not counted (their host copies are the checkpoint).",
             "", "| loop | host syncs per step (mean) | per step | call sites |", "|---|---:|---|---|"]
    for name, (steps, sites) in rows.items():
        where = "; ".join(f"{site} x{n}" for site, n in sites.most_common(4)) or "none"
        lines.append(f"| {name} | {sum(steps) / max(len(steps), 1):.2f} | {steps} | {where} |")
        print(name, steps, dict(sites))
    if not args.no_append:
        append("Host synchronisations per training step", "\n".join(lines))


if __name__ == "__main__":
    main()
