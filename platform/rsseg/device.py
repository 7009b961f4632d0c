"""The one device policy (``runtime.device: auto | cpu | cuda``) every stage uses.

``auto`` means: the GPU Ray granted this process when it runs inside a Ray task (a sweep trial
with ``search.resources.gpu`` > 0, a Train worker with ``use_gpu``), else the local CUDA device
when torch sees one, else the CPU. ``cuda`` without a CUDA device — or a Ray grant of a GPU that
torch cannot see — is a one-line error: a paper-scale run never falls back to the CPU silently.
Precision follows the device: bf16 autocast on CUDA (``precision: auto | bf16``), fp32 otherwise;
the noise maths stays float32 either way (methods/ddpm/noise.py).
"""

from __future__ import annotations

import os
import time
from contextlib import AbstractContextManager, nullcontext

import torch

from rsseg.errors import ConfigError


def ray_granted_gpus() -> list | None:
    """The GPU ids Ray granted this process, or None outside a Ray worker."""
    try:
        import ray
    except ImportError:  # the compute core runs without Ray (a GPU box with torch only)
        return None
    if not ray.is_initialized():
        return None
    try:
        ctx = ray.get_runtime_context()
        if ctx.worker.mode != ray.WORKER_MODE:
            return None
        return list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - not inside a task or actor
        return None


def resolve(setting: str = "auto") -> torch.device:
    if setting == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    granted = ray_granted_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    if granted and not has_cuda:
        raise ConfigError(f"runtime.device: Ray granted this process GPU {granted} but torch {torch.__version__} sees no CUDA "
                          f"device (CUDA_VISIBLE_DEVICES={visible}); install a CUDA build of torch (TORCH_SPEC) on the workers")
    if setting == "cuda":
        if not has_cuda:
            raise ConfigError(f"runtime.device: cuda, but torch {torch.__version__} sees no CUDA device "
                              f"(CUDA_VISIBLE_DEVICES={visible}); use runtime.device: auto or cpu, or a GPU machine")
        if granted is not None and not granted:
            raise ConfigError("runtime.device: cuda, but Ray granted this process no GPU (search.resources.gpu or "
                              "pretrain.runtime.gpus_per_worker is 0)")
        return torch.device("cuda")
    if granted is not None:  # inside Ray: the grant decides
        return torch.device("cuda") if granted else torch.device("cpu")
    return torch.device("cuda") if has_cuda else torch.device("cpu")


def compute_precision(device: torch.device, precision: str = "auto") -> str:
    """The arithmetic a run's networks use: ``bf16`` (autocast) on CUDA with ``auto`` / ``bf16``,
    ``fp32`` on the CPU or with ``fp32``."""
    return "bf16" if device.type == "cuda" and precision in ("auto", "bf16") else "fp32"


def autocast(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """bf16 autocast on CUDA (``auto`` / ``bf16``), nothing on the CPU or with ``fp32``."""
    if compute_precision(device, precision) == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def describe(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H200)``: what runs log as their device."""
    if device.type != "cuda":
        return "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def gpu_share(setting: str, share: float | None, available: float | None, *, key: str, who: str, where: str = "the Ray cluster") -> float:
    """The device policy for a Ray task's GPU request, in one place (sweep trials, pre-training
    workers): ``share`` GPU per task (None: the default, 1 when the policy says CUDA: ``cuda``, or
    ``auto`` where GPUs are) against ``runtime.device`` and the GPUs ``available`` (None: not known
    yet). Refused: a GPU for a CPU run, none for a CUDA run, one where there is none. ``key`` names
    the request, ``who`` what makes it ("each trial"), ``where`` whose GPUs ``available`` counts."""
    if share is None:
        share = 1.0 if setting == "cuda" or (setting == "auto" and bool(available)) else 0.0
    if setting == "cpu" and share > 0:
        raise ConfigError(f"runtime.device: cpu, but {who} reserves {share:g} GPU ({key}); set {key}: 0 or runtime.device: auto")
    if setting == "cuda" and share == 0:
        raise ConfigError(f"runtime.device: cuda, but {who} reserves no GPU ({key}: 0); give it a share, e.g. --set {key}=0.25")
    if available is not None and share > 0 and available == 0:
        raise ConfigError(f"{key}: {who} reserves {share:g} GPU but {where} has none; run on a GPU cluster (--address) or set "
                          f"--set {key}=0 and runtime.device: cpu")
    return share


def check_sweep_resources(device_setting: str, gpus_per_trial: float, cluster_gpus: float | None) -> None:
    """Before any trial starts: the device policy and the trial's GPU share must agree with
    each other and (when known) with the cluster."""
    gpu_share(device_setting, gpus_per_trial, cluster_gpus, key="search.resources.gpu", who="each trial")


class Stopwatch:
    """Seconds of device work in timed blocks, without making the host wait for the device at
    each block: on CUDA a pair of events per block, summed when `seconds` is read (one wait then);
    elsewhere the host's clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []
        self.total = 0.0

    def __enter__(self) -> "Stopwatch":
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.pending.append([start, None])
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending[-1][1] = end
        else:
            self.total += time.perf_counter() - self._t0

    @property
    def seconds(self) -> float:
        if self.pending:
            self.pending[-1][1].synchronize()
            self.total += sum(start.elapsed_time(end) for start, end in self.pending) / 1000.0
            self.pending = []
        return self.total
