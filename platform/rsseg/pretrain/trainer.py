"""One trainer for every pre-training objective: what each Ray Train worker runs.

``Trainer.fit()`` reads top to bottom: resume -> a loop of ``step()`` -> ``save()``. Around the
step, small collaborators do one job each:

- `Ema` — rank 0's exponential moving average of the weights (the usual choice for features),
  built once the network is on its device, so its shadow lives there too;
- `rsseg.device.autocast` — bf16 autocast on CUDA, fp32 elsewhere (the noise maths stays float32);
- `Checkpoints` — rank 0 writes an atomic checkpoint every K steps (model, EMA, optimiser, step,
  data position, RNG states of the host and the GPU, resolved spec, git commit) into the
  fingerprint's store, and a restarted worker group resumes from the newest *valid* one;
- `rsseg.scalars.DeviceScalars` — each step's loss (averaged over the ranks on the device:
  NCCL reduces device tensors only) and logged terms stay on the device and are read back once
  per ``log_every`` steps (one host synchronisation), where a non-finite loss is caught before
  anything is saved; `tracking.MetricBuffer` then logs them to MLflow in batches (rank 0) and a
  progress file shows them to the driver;
- `Group` — what the worker needs from its worker group: Ray Train's (`RayGroup`: DDP set up by
  Ray, reports and checkpoints registered with it) or none (`LocalGroup`: the GPU check, tests);
- `Fault` — a test hook that kills one worker once at a step.

Each worker draws its share of every global batch from the step number alone
(`schedule.batch_keys`, a distributed sampler over per-epoch permutations) and switches from
archive to homogeneous imagery at the planned step. Learning rate, data order, augmentation and
noise are pure functions of the step (and rank), so a run stopped at step k and resumed ends with
the weights of an uninterrupted one. The driver side (planning, MLflow run, Ray Train) is
`rsseg.pretrain.launch`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rsseg.config.specs import RunSpecBase
from rsseg.device import autocast, describe
from rsseg.errors import CheckpointError
from rsseg.checkpoints import store
from rsseg.pretrain import schedule
from rsseg.provenance import stamp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    """Test hook at a step of one worker: ``kill`` it once (a marker file makes it happen once),
    or ``disk_full``: a write fails with ENOSPC (every time: a full disk stays full; the marker
    file counts the attempts)."""

    step: int
    rank: int
    marker: str
    kind: str = "kill"


@dataclass(frozen=True)
class TrainPlan:
    """Everything a worker needs, decided by the driver from the resolved run (pickled to every
    worker as it is: the worker re-parses and re-derives nothing)."""

    fingerprint: str
    store_root: str
    workdir: str
    run: RunSpecBase  # the validated spec (rsseg.resolved.ResolvedRun.spec)
    in_channels: int
    counts: tuple[int, int]
    tracking_uri: str
    mlflow_run_id: str
    storage: str | None = None  # the shared storage (rsseg.workdir), None: the work directory
    threads: int = 1
    stop_after: int | None = None
    resume_from: str | None = None
    fault: Fault | None = None
    # the shared archive phase (rsseg.checkpoints.identity): start from its point at the switch
    # step when there is one, and leave a point at every step of ``switch_steps`` on the way
    trunk: str | None = None
    trunk_root: str | None = None
    switch_steps: tuple[int, ...] = ()
    # Ray Train's local mode (one worker in the driver's process): the device the driver's policy
    # chose ("cuda" / "cpu"); None: a worker actor, whose device Ray's grant decides
    local_device: str | None = None


# ---------------------------------------------------------------------------------------------- collaborators


class Ema:
    """Exponential moving average of a network's weights (buffers too), with the usual warm-up
    decay_t = min(decay, (1 + t) / (10 + t)) so short runs are not stuck at the init.

    The shadow is a float32 copy made where the network's weights are: build it after the
    network is moved to its device (a shadow left on the host made every CUDA step add device
    weights into host tensors). One multi-tensor op per update rather than one per weight.

    Kept instead of diffusers' EMAModel: that one skips the first update (decay 0 at step 1) and
    computes s - (1 - d)(s - p) on parameters only, which changes the numbers of every checkpoint."""

    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in net.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadow, live = [], []
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                shadow.append(self.shadow[k])
                live.append(v.detach().float())
            else:
                self.shadow[k].copy_(v)
        torch._foreach_mul_(shadow, d)
        torch._foreach_add_(shadow, live, alpha=1 - d)

    def state_dict(self) -> dict[str, Any]:
        """The shadow on the host (a checkpoint loads on any machine)."""
        return {"shadow": {k: v.detach().cpu() for k, v in self.shadow.items()}, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copied into the shadow, which stays on the network's device."""
        theirs = state["shadow"]
        if set(theirs) != set(self.shadow):
            odd = sorted(set(theirs) ^ set(self.shadow))
            raise CheckpointError(f"the checkpoint's EMA weights are another network's ({len(odd)} keys differ, e.g. {odd[0]!r})")
        for k, v in theirs.items():
            self.shadow[k].copy_(v)
        self.updates = int(state["updates"])

    def copy_into(self, net: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``net`` holding the EMA weights (for samples drawn from them)."""
        import copy

        view = copy.deepcopy(net)
        view.load_state_dict({k: v.to(next(net.parameters()).dtype) for k, v in self.shadow.items()})
        return view


def rng_states(device: torch.device | None = None) -> dict[str, Any]:
    """Global RNG states as tensors and ints (loadable with ``weights_only=True``). The training
    step itself draws its noise from per-step generators; these cover the rest: dropout (sr3's
    0.2) draws from the generator of the device it runs on, so on a GPU the CUDA generators'
    states are saved too, or a resumed run would drop other units than an uninterrupted one."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if device is not None and device.type == "cuda":
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    if states.get("cuda") and torch.cuda.is_available():
        for index, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


def mean_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a 0-dim tensor over the ranks, reduced where it is: NCCL has no host backend,
    and moving it to the host first would also wait for the device at every step."""
    if world == 1:
        return value
    import torch.distributed as dist

    total = value.detach().float().clone()
    dist.all_reduce(total)
    return total / world


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


class Checkpoints:
    """The fingerprint's periodic checkpoints: the newest valid one to resume from, and atomic
    writes (plus pruning to ``keep``)."""

    def __init__(self, sdir: store.StoreDir, fingerprint: str, keep: int):
        self.sdir, self.fingerprint, self.keep = sdir, fingerprint, keep

    def resume_state(self, explicit: str | None) -> tuple[int, dict[str, Any] | None]:
        found = store.latest_valid(self.sdir, self.fingerprint)
        if found is not None:
            start, path = found
            return start, store.load(path, self.fingerprint)
        if explicit:
            state = store.load(Path(explicit), self.fingerprint)
            return int(state["step"]), state
        return 0, None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        path = store.save(self.sdir.ckpt / f"step_{step:08d}.pt", state, self.fingerprint, step)
        store.prune(self.sdir, self.keep)
        return path


class _StepBatches(torch.utils.data.Sampler):
    """Batch sampler over the steps of one phase: yields this rank's keys per step."""

    def __init__(self, seed: int, phase: schedule.Phase, first: int, last: int, n: int, batch: int, rank: int, world: int):
        self.args = (seed, phase, first, last, n, batch, rank, world)

    def __len__(self) -> int:
        return self.args[3] - self.args[2]

    def __iter__(self):
        seed, phase, first, last, n, batch, rank, world = self.args
        for local in range(first, last):
            yield schedule.batch_keys(seed, phase, local, n, batch, rank, world)


def batches(data: dict, phases: list[schedule.Phase], start: int, end: int, seed: int, batch: int, rank: int, world: int,
            loader_workers: int, pin: bool = False):
    """(step, phase, data position, images) for steps [start, end), phase by phase; with
    ``loader_workers`` > 0 the windows are read ahead in DataLoader worker processes. ``pin``:
    page-locked batches, so their copy to a GPU does not wait for the device."""
    from rsseg.data.dataset import collate

    for phase in phases:
        first = max(0, start - phase.start)
        last = min(phase.length, end - phase.start)
        if first >= last:
            continue
        ds = data[phase.name]
        sampler = _StepBatches(seed, phase, first, last, len(ds), batch, rank, world)
        if loader_workers:
            loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=loader_workers, collate_fn=collate,
                                                 pin_memory=pin)
        else:
            loader = (collate([ds[k] for k in keys]) for keys in sampler)
        for local, b in zip(range(first, last), loader):
            images = b["image"].pin_memory() if pin and not loader_workers else b["image"]
            yield phase.start + local, phase, schedule.position(phase, local, len(ds), batch), images


class Group(Protocol):
    """What a worker needs from its worker group (the Trainer's only link to Ray)."""

    def prepare(self, net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``net`` on ``device`` (moved in place), wrapped for data parallelism where there is some."""

    def node(self) -> str:
        """The node this worker runs on."""

    def report(self, metrics: dict[str, float], ckpt_path: Path | None) -> None:
        """Tell the group manager a step is done (with the checkpoint rank 0 wrote, if any)."""


class RayGroup:
    """Ray Train's worker group: DDP set up by Ray, reports (and checkpoint pointers) to it.
    ``local``: Ray Train's local mode, one worker in the driver's process (no group to restart,
    no DDP, no Ray node)."""

    def __init__(self, local: bool = False):
        self.local = local

    def prepare(self, net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if self.local:
            return net.to(device)
        import ray.train.torch

        return ray.train.torch.prepare_model(net)

    def node(self) -> str:
        if self.local:
            import socket

            return socket.gethostname()
        import ray

        return ray.get_runtime_context().get_node_id()

    def report(self, metrics: dict[str, float], ckpt_path: Path | None) -> None:
        """Every rank reports; rank 0 attaches a pointer to the checkpoint it just wrote, so a
        worker failure restarts the group from there (Ray Train FailureConfig). The checkpoint
        itself is in the storage (pushed there by `store.save`, read by any node through its
        mirror), so it is written once, with its manifest, not a second time into Ray's storage.
        Local mode restarts nothing: the report carries no pointer."""
        import ray.train

        if ckpt_path is None or self.local:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            Path(d, "pointer.json").write_text(json.dumps({"path": str(ckpt_path), "step": metrics["step"]}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class LocalGroup:
    """No worker-group manager: one process, or a ``torch.distributed`` group the caller set up
    (then DDP). Reports go nowhere; checkpoints are in the store all the same."""

    def prepare(self, net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        import torch.distributed as dist

        net.to(device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        return net

    def node(self) -> str:
        import socket

        return socket.gethostname()

    def report(self, metrics: dict[str, float], ckpt_path: Path | None) -> None:
        return None


# ---------------------------------------------------------------------------------------------- the trainer


class Trainer:
    """One worker's share of a pre-training (Ray Train: DDP over gloo on CPU, NCCL on GPU)."""

    def __init__(self, plan: TrainPlan, rank: int, world: int, device: torch.device, *, group: Group | None = None,
                 data: dict[str, Any] | None = None):
        """``data``: the {"archive", "homogeneous"} tile datasets, read from the run's imagery when
        not given. Without an MLflow run in the plan (``mlflow_run_id`` empty) nothing is tracked."""
        from rsseg.scalars import DeviceScalars
        from rsseg.tracking import MetricBuffer

        self.plan, self.rank, self.world, self.device = plan, rank, world, device
        self.group = group or LocalGroup()
        self.run = plan.run
        self.runtime = self.run.pretrain.runtime
        self.total = sum(plan.counts)
        self.end = min(self.total, plan.stop_after) if plan.stop_after is not None else self.total
        self.phases = schedule.phases(*plan.counts)
        self.data = data if data is not None else self._read_data()
        self.sdir = store.StoreDir(Path(plan.store_root))
        self.checkpoints = Checkpoints(self.sdir, plan.fingerprint, self.runtime.keep_checkpoints)

        torch.manual_seed(self.run.pretrain.seed)  # identical initial weights on every rank
        self.objective = self.run.plugin.build_objective(self.run, plan.in_channels)
        self.net = self.objective.network
        self.optim = self.objective.optim
        self.ema: Ema | None = None  # built in fit(), once the network is on its device
        self.tracker = self._tracker() if rank == 0 else None
        self.metrics = MetricBuffer(self.tracker, (self.tracker.last_step("loss") if self.tracker else None) or -1)
        self.scalars = DeviceScalars(watch=("loss",))
        self.start, self.position = 0, None
        self.trunk_start = 0  # the step this pre-training started from (a trunk point, or 0)

    def _read_data(self) -> dict[str, Any]:
        from rsseg.pretrain.data import pretrain_datasets
        from rsseg.workdir import Workdir

        archive, homogeneous = pretrain_datasets(self.run, Workdir.at(self.plan.workdir, self.plan.storage))
        return {"archive": archive, "homogeneous": homogeneous}

    def _tracker(self):
        from rsseg.tracking import Run

        return Run(self.plan.tracking_uri, self.plan.mlflow_run_id, "") if self.plan.mlflow_run_id else None

    # -- fit = resume -> steps -> save -----------------------------------------------------------
    def fit(self) -> None:
        state = self.resume()
        self.record_group()
        self.model = self.group.prepare(self.net, self.device)
        if self.rank == 0 and self.run.pretrain.ema.enabled:
            self.ema = Ema(self.net, self.run.pretrain.ema.decay)  # the network is on its device now
            if state is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.optim.lr, betas=tuple(self.optim.betas),
                                     weight_decay=self.optim.weight_decay)
        if state is not None:
            self.opt.load_state_dict(state["optimizer"])
            self.position = schedule.DataPosition(**state["data_position"])
        self.model.train()
        self.clock = (time.perf_counter(), self.start)
        self.t0 = time.perf_counter()
        for step, phase, position, images in batches(self.data, self.phases, self.start, self.end, self.run.pretrain.seed,
                                                     self.run.pretrain.batch_size, self.rank, self.world,
                                                     self.run.runtime.loader_workers, pin=self.device.type == "cuda"):
            self.position = position
            loss, lr, logs = self.step(step, images.to(self.device, non_blocking=True))
            self.after_step(step + 1, phase, loss, lr, logs)
        if self.rank == 0 and self.end == self.total:
            if self.tracker is not None:
                self.tracker.log_metrics({"train/iterations_trained": self.total - self.trunk_start}, step=self.total)
            self.save()

    def resume(self) -> dict[str, Any] | None:
        """Load the newest valid checkpoint of this fingerprint (or the explicit one), else the
        trunk's latest point up to this run's switch step (the shared archive phase), else start
        fresh: from ``pretrain.init``'s imported weights, or the seeded init."""
        self.start, state = self.checkpoints.resume_state(self.plan.resume_from)
        if state is not None:
            self.trunk_start = int(state.get("trunk_start", 0))
        elif self.plan.trunk is not None:
            found = store.latest_trunk_point(Path(self.plan.trunk_root), self.plan.trunk, self.plan.counts[0])
            if found is not None:
                self.start, state = found[0], store.load(found[1], self.plan.trunk)
                self.trunk_start = self.start
                if self.tracker is not None:
                    self.tracker.set_tags({"started_from_trunk_point": str(self.start)})
        if state is None and self.run.pretrain.init:
            self.load_init(self.run.pretrain.init)
        if state is not None:
            self.net.load_state_dict(state["model"])
            restore_rng(state["rng"])
            if self.rank == 0:
                log.info("resuming %s at step %d", self.sdir.root.name, self.start)
        return state

    def load_init(self, name: str) -> None:
        """Imported weights as the starting point: they must describe the same network and schedule."""
        from rsseg.errors import ConfigError
        from rsseg.checkpoints.store import imported
        from rsseg.workdir import Workdir

        state = imported(name, Workdir.at(self.plan.workdir, self.plan.storage)).load()
        # the objective's network is built from the imported weights' (methods.ddpm.rules.network); what
        # can still differ is the bands: the data's against those the weights take
        theirs = {k: v for k, v in state["objective"]["unet"].items() if k != "sample_size"}
        ours = {k: v for k, v in self.objective.describe()["unet"].items() if k != "sample_size"}
        if theirs != ours:
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise ConfigError(f"pretrain.init: the imported weights {name!r} are another network than this run's "
                              f"({', '.join(f'{k} {theirs.get(k)} vs {ours.get(k)}' for k in diff)})")
        self.net.load_state_dict(state["model"])  # the EMA, built in fit(), starts from these weights
        if self.tracker is not None:  # continued on the run's own schedule, whatever the release was trained with
            self.tracker.set_tags({"init_trained_schedule": str(state.get("trained_schedule") or state["objective"]["schedule"])})

    def record_group(self) -> None:
        """Rank 0 tags the run with the node of every worker of this (re)started group and logs
        where the group started and how many steps a restart redid (those after the checkpoint it
        resumed from, already logged before the failure)."""
        import torch.distributed as dist

        node = self.group.node()
        nodes = [node] * self.world
        if self.world > 1:
            dist.all_gather_object(nodes, node)
        if self.tracker is not None:
            self.tracker.set_tags({"worker_nodes": ",".join(f"rank{r}={n}" for r, n in enumerate(nodes)),
                                   "device": describe(self.device)})  # as fine-tuning runs spell it
            redone = max(0, self.metrics.logged_up_to - self.start) if self.start or self.metrics.logged_up_to > 0 else 0
            self.tracker.log_metrics({"train/group_start": self.start, "train/steps_redone": redone}, step=self.start)

    def step(self, step: int, images: torch.Tensor) -> tuple[torch.Tensor, float, dict[str, Any]]:
        """One optimisation step at global step ``step``; returns (the loss averaged over the
        ranks, lr, the objective's logged terms): device tensors, read at the next flush."""
        lr = schedule.lr_at(step, self.optim, self.total)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.run.runtime.precision):
            loss, logs = self.objective.loss(self.model, images, step_generator(self.run.pretrain.seed, step, self.rank))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.optim.grad_clip:
            logs = {**logs, "grad_norm": torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)}
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.net)
        fault = self.plan.fault
        if fault is not None and step == fault.step and self.rank == fault.rank:
            self._inject(fault, step)
        return mean_over_ranks(loss.detach().float(), self.world), lr, logs

    def _inject(self, fault: Fault, step: int) -> None:
        if fault.kind == "disk_full":
            with open(fault.marker, "a") as fh:
                fh.write(f"worker {self.rank}: no space at step {step}\n")
            target = Path(self.plan.store_root) / "ckpt" / f"step_{step:08d}.pt"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        if not os.path.exists(fault.marker):
            Path(fault.marker).write_text(f"worker {self.rank} killed at step {step}\n")
            os._exit(1)

    def after_step(self, done: int, phase: schedule.Phase, loss: torch.Tensor, lr: float, logs: dict[str, Any]) -> None:
        """The step's scalars are kept (on the device); every ``log_every`` / ``checkpoint_every``
        steps, at a trunk point and at the end they are read (one host synchronisation, which
        also stops a non-finite loss before anything is saved), then: MLflow, the progress file,
        the checkpoint (rank 0) and the report to the worker group (every rank)."""
        self.scalars.add(done, {"loss": loss, "lr": lr, "phase": 0.0 if phase.name == "archive" else 1.0, **logs})
        due_checkpoint = done % self.runtime.checkpoint_every == 0 or done == self.end
        due_log = done % self.runtime.log_every == 0 or due_checkpoint
        if not (due_log or self.trunk_point_due(done)):
            return
        point = self.read_scalars()
        self.leave_trunk_point(done)
        if not due_log:
            return
        now = time.perf_counter()
        t_last, step_last = self.clock
        ips = (done - step_last) * self.run.pretrain.batch_size / max(now - t_last, 1e-9)
        self.clock = (now, done)
        if self.tracker is not None:
            self.metrics.add(done, {"images_per_s": ips, "seconds_per_iteration": self.run.pretrain.batch_size / max(ips, 1e-9)})
            self.metrics.flush()
            self.write_progress(done, point, ips, phase, now)
        ckpt = self.checkpoints.save(done, self.state(done)) if (self.rank == 0 and due_checkpoint) else None
        self.group.report({"step": done, "loss": point["loss"], "lr": point["lr"], "images_per_s": ips}, ckpt)

    def read_scalars(self) -> dict[str, float]:
        """The kept scalars to the host and into the metric buffer; the newest step's values."""
        from rsseg.scalars import NonFinite

        try:
            points = self.scalars.read()
        except NonFinite as exc:
            raise FloatingPointError(f"pre-training {exc}") from None
        for step, values in points:
            self.metrics.add(step, values)
        return points[-1][1]

    def trunk_point_due(self, done: int) -> bool:
        """Whether a trunk point is left after step ``done`` (every rank flushes there alike, so a
        non-finite loss stops all of them at the same step)."""
        plan = self.plan
        return plan.trunk is not None and done in plan.switch_steps and done <= plan.counts[0]

    def leave_trunk_point(self, done: int) -> None:
        """Rank 0, after step ``done`` of the archive phase: the full training state as the
        trunk's point at that step, when a planned run switches there and it is not stored yet."""
        plan = self.plan
        if self.rank != 0 or not self.trunk_point_due(done):
            return
        tdir = Path(plan.trunk_root)
        try:
            if store.validate(store.trunk_point(tdir, done))["fingerprint"] == plan.trunk:
                return  # another run of this trunk left it already
        except CheckpointError:
            pass
        tdir.mkdir(parents=True, exist_ok=True)
        store.save(store.trunk_point(tdir, done), {**self.state(done), "fingerprint": plan.trunk}, plan.trunk, done)

    def save(self) -> None:
        """Rank 0, at the end: sample-grid artifacts (from the EMA weights), final.pt and DONE."""
        homogeneous = self.data["homogeneous"]
        images = torch.stack([homogeneous[i]["image"] for i in range(min(4, len(homogeneous)))]).to(self.device)
        view = self.ema.copy_into(self.net) if self.ema is not None else self.net
        with tempfile.TemporaryDirectory() as d:
            paths = self.objective.artifacts(view, images, torch.Generator().manual_seed(0), Path(d),
                                             samples=self.runtime.samples, sample_steps=self.runtime.sample_steps)
            for p in paths if self.tracker is not None else ():
                self.tracker.log_artifact(p, "samples")
        store.finalize(self.sdir, self.state(self.total), self.plan.mlflow_run_id)

    # -- helpers ---------------------------------------------------------------------------------
    def state(self, step: int) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.opt.state_dict(),
            "step": step,
            "data_position": self.position.as_dict(),
            "rng": rng_states(self.device),
            "objective": self.objective.describe(),
            "spec": self.run.model_dump(mode="json"),
            "fingerprint": self.plan.fingerprint,
            "method": self.run.method,
            "resumed_from": self.start,
            "trunk_start": self.trunk_start,
            **stamp(),
        }

    def write_progress(self, done: int, point: dict[str, float], ips: float, phase: schedule.Phase, now: float) -> None:
        from rsseg.atomic import atomic_write_text

        eta = (self.total - done) * (now - self.t0) / max(done - self.start, 1)
        atomic_write_text(self.sdir.progress, json.dumps({"step": done, "total": self.total, "loss": point["loss"], "lr": point["lr"],
                                                          "images_per_s": ips, "eta_s": eta, "phase": phase.name}))
        from rsseg import storage

        storage.push(self.sdir.progress)  # object storage: the driver polls it


def worker_loop(config: dict[str, Any]) -> None:
    """The Ray Train entry point of every worker."""
    import ray.train
    import ray.train.torch

    from rsseg import kernels
    from rsseg.workdir import Workdir

    plan: TrainPlan = config["plan"]
    Workdir.at(plan.workdir, plan.storage).export()  # the store's files resolve against the driver's storage
    kernels.pin(plan.run.runtime.cpu_kernels)  # inherited from the driver on a local cluster; set here on any other
    ctx = ray.train.get_context()
    if plan.local_device is None:  # a worker actor: its process, its threads, the device Ray granted
        torch.set_num_threads(plan.threads)
        Trainer(plan, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), group=RayGroup()).fit()
        return
    before = torch.get_num_threads()  # local mode: the driver's process, which goes on after this
    torch.set_num_threads(plan.threads)
    try:
        Trainer(plan, 0, 1, torch.device(plan.local_device), group=RayGroup(local=True)).fit()
    finally:
        torch.set_num_threads(before)
