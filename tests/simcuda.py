"""A simulated CUDA device on the CPU, for testing the GPU code paths where no GPU is lent.

Inside ``simulated_cuda()`` torch behaves, for the code under test, like a machine with one
CUDA device whose kernels are strict about where their operands live:

- ``SimTensor`` holds a real CPU tensor (``elem``) and reports ``device == cuda:0`` and
  ``is_cuda``. Every ATen op on it goes through ``__torch_dispatch__``, which checks the
  operands' devices the way CUDA kernels do: a CPU tensor mixed into an op on device tensors is
  an error (``Expected all tensors to be on the same device``), except 0-dim CPU tensors
  (scalars, as CUDA allows), copies between devices (``copy_``) and the indices of index ops.
- ``.to("cuda")`` / ``.cuda()`` / factories with ``device="cuda"`` give SimTensors (copies,
  as a host-to-device transfer is); ``.cpu()`` / ``.to("cpu")`` give plain CPU tensors;
  ``nn.Module.to`` swaps the parameters in place (``Parameter`` identity kept, as on CUDA).
- CUDA's own generator is simulated: random ops on device tensors draw from it (not from the
  CPU generator), ``torch.manual_seed`` / ``torch.cuda.manual_seed*`` seed it, and
  ``torch.cuda.get_rng_state_all`` / ``set_rng_state_all`` read and set it. A CPU
  ``torch.Generator`` passed to a draw on the device raises, as CUDA does.
- ``.numpy()`` of a device tensor raises, as it does on CUDA. ``torch.save`` writes device
  tensors as CPU tensors (what loading with ``map_location="cpu"`` gives back).
- ``torch.autocast("cuda", dtype=bfloat16)`` is CPU autocast, so the mixed-precision paths run
  with the dtypes they have on a GPU. The convolutions and matrix products of bf16 operands
  compute in fp32 and round their outputs to bf16, as a GPU's tensor cores do (fp32
  accumulation); the host's own bf16 kernels are ~100x slower without AVX-512 BF16 (3 GFLOP/s),
  and the simulation checks dtypes and devices, not the kernels.
- Host synchronisations are counted per call site (the first frame in the platform's or the
  baselines' code): ``.item()`` / ``float()`` / ``bool()`` / ``int()`` of a device tensor,
  ``.tolist()``, copies to the host, ops whose output size depends on the data
  (``nonzero``, ``masked_select``, boolean indexing, ``unique``), and
  ``torch.cuda.synchronize()``.
- ``torch.distributed.all_reduce`` / ``all_gather_object`` stand for an NCCL process group of
  ``world`` identical ranks: device tensors only ("No backend type associated with device type
  cpu" otherwise, NCCL's refusal).

Not simulated: kernels' speed and memory, streams, non-determinism of GPU kernels.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
REPO = Path(__file__).resolve().parents[1]
WATCHED = (str(REPO / "platform"), str(REPO / "baselines"), str(REPO / "bench"))

# ops that read device data to decide their output's size: a host synchronisation on CUDA
SIZE_FROM_DATA = {"aten.nonzero.default", "aten.masked_select.default", "aten._unique2.default", "aten.unique_dim.default",
                  "aten.unique_consecutive.default", "aten.nonzero_static.default"}
# ops that may take their indices (or a scalar operand) on the host
# bf16 ops computed in fp32, outputs rounded to bf16 (see the module's docstring)
FP32_ACCUMULATE = {"aten.convolution.default", "aten.convolution_backward.default", "aten.mm.default", "aten.addmm.default",
                   "aten.bmm.default", "aten.baddbmm.default"}
MIXED_OK = {"aten.copy_.default", "aten.index.Tensor", "aten.index_put_.default", "aten._index_put_impl_.default",
            "aten.index_put.default", "aten.lift_fresh.default", "aten._to_copy.default", "aten.set_.source_Tensor"}


@dataclass
class Syncs:
    """Host synchronisations seen, per call site ("platform/rsseg/finetune.py:231 (item)")."""

    sites: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def add(self, kind: str) -> None:
        self.sites[f"{_call_site()} ({kind})"] += 1

    def clear(self) -> None:
        self.sites.clear()

    def since(self, before: Counter) -> Counter:
        return self.sites - before


@dataclass
class SimState:
    syncs: Syncs = field(default_factory=Syncs)
    rng: torch.Tensor = field(default_factory=lambda: torch.Generator().manual_seed(0).get_state())
    world: int = 1
    lock: threading.RLock = field(default_factory=threading.RLock)


STATE: SimState | None = None


def _call_site() -> str:
    """The innermost frame in the platform's, the baselines' or the benchmarks' code."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(WATCHED):
            return f"{Path(frame.filename).relative_to(REPO)}:{frame.lineno}"
    return "elsewhere"


def _sync(kind: str) -> None:
    if STATE is not None:
        STATE.syncs.add(kind)


class SimTensor(torch.Tensor):
    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False):
        assert not isinstance(elem, SimTensor) and elem.device.type == "cpu", type(elem)
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
                                                dtype=elem.dtype, layout=elem.layout, device=elem.device,
                                                requires_grad=requires_grad)
        r.elem = elem
        return r

    @property
    def device(self) -> torch.device:  # noqa: D401 - what code under test sees
        return CUDA

    @property
    def is_cuda(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"SimTensor(cuda:0, {self.elem!r})"

    def __reduce_ex__(self, protocol):
        # torch.save of a device tensor: stored as the CPU tensor map_location="cpu" gives back
        _sync("save")
        return self.elem.detach().clone().__reduce_ex__(protocol)

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first.")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        flat, _ = tree_flatten((args, kwargs))
        on_device = any(isinstance(x, SimTensor) for x in flat)
        host = [x for x in flat if isinstance(x, torch.Tensor) and not isinstance(x, SimTensor) and x.dim() > 0]
        if on_device and host and name not in MIXED_OK:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
                               f"(simulated CUDA: {name} got a CPU tensor of shape {tuple(host[0].shape)})")
        gen = kwargs.get("generator")
        if on_device and gen is not None and gen.device.type != "cuda":
            raise RuntimeError(f"Expected a 'cuda' device type for generator but found '{gen.device.type}' (simulated CUDA: {name})")
        if name == "aten._local_scalar_dense.default":
            _sync("item")
        elif name in SIZE_FROM_DATA or (name == "aten.index.Tensor" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)):
            _sync(name.split(".")[1])
        elif name == "aten.copy_.default" and not isinstance(args[0], SimTensor) and isinstance(args[1], SimTensor):
            _sync("copy to host")
        unwrapped_args = tree_map(_unwrap, args)
        unwrapped_kwargs = tree_map(_unwrap, kwargs)
        if on_device and gen is None and torch.Tag.nondeterministic_seeded in func.tags:
            out = _on_device_rng(lambda: func(*unwrapped_args, **unwrapped_kwargs))
        elif on_device and name in FP32_ACCUMULATE and _all_bf16(flat):
            out = tree_map(_to_bf16, func(*tree_map(_to_fp32, unwrapped_args), **tree_map(_to_fp32, unwrapped_kwargs)))
        else:
            out = func(*unwrapped_args, **unwrapped_kwargs)
        if name == "aten.copy_.default" and not isinstance(args[0], SimTensor):
            return args[0]  # a copy into a host tensor stays on the host
        if not on_device:
            return out
        return tree_map(lambda x: SimTensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, SimTensor) else x, out)


def _unwrap(x):
    return x.elem if isinstance(x, SimTensor) else x


def _all_bf16(flat) -> bool:
    """Every floating operand is bf16 (a mix of dtypes keeps the real kernel, and its error)."""
    floats = [x.dtype for x in flat if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return bool(floats) and all(d == torch.bfloat16 for d in floats)


def _to_fp32(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x


def _to_bf16(x):
    return x.to(torch.bfloat16) if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x


def _on_device_rng(draw):
    """Run ``draw`` (CPU kernels) on the simulated CUDA generator's state, not the CPU one's."""
    state = STATE
    if state is None:
        return draw()
    with state.lock:
        cpu = torch.get_rng_state()
        torch.set_rng_state(state.rng)
        try:
            return draw()
        finally:
            state.rng = torch.get_rng_state()
            torch.set_rng_state(cpu)


class _ToDevice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return SimTensor(x.detach().clone())

    @staticmethod
    def backward(ctx, g):
        return _ToHost.apply(g) if isinstance(g, SimTensor) else g


class _ToHost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        _sync("copy to host")
        return x.elem.detach().clone()

    @staticmethod
    def backward(ctx, g):
        return _ToDevice.apply(g)


def to_device(x: torch.Tensor) -> torch.Tensor:
    if isinstance(x, SimTensor):
        return x
    return _ToDevice.apply(x) if x.requires_grad else SimTensor(x.detach().clone())


def to_host(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, SimTensor):
        return x
    return _ToHost.apply(x) if x.requires_grad else _ToHost.forward(None, x)


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # an index means a CUDA device in torch's factory functions
    return torch.device(device).type == "cuda"


_HOST_AUTOCAST = torch.amp.autocast  # the real class (torch.autocast is patched inside the simulation)


class _SimMode(TorchFunctionMode):
    """Where a tensor is put: device arguments, ``.to`` / ``.cuda`` / ``.cpu``, host-side reads;
    and CUDA autocast (simulated by CPU autocast) kept off the ops that involve host tensors only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _Autocast.depth and not _touches_device(args, kwargs) and not _is_cuda(kwargs.get("device")):
            with _HOST_AUTOCAST("cpu", enabled=False):
                return self._dispatch(func, args, kwargs)
        return self._dispatch(func, args, kwargs)

    def _dispatch(self, func, args, kwargs):
        if func is torch.Tensor.to:
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            x = args[0]
            if device is None or device.type not in ("cuda", "cpu"):  # a dtype change, or the meta device
                return func(*args, **kwargs)
            y = to_device(x) if device.type == "cuda" else to_host(x)
            return y.to(dtype) if dtype is not None and y.dtype != dtype else y
        if func is torch.Tensor.cuda:
            return to_device(args[0])
        if func is torch.Tensor.cpu:
            return to_host(args[0])
        if func is torch.Tensor.tolist and isinstance(args[0], SimTensor):
            _sync("tolist")
            return args[0].elem.tolist()
        if func in (torch.Tensor.pin_memory, torch.Tensor.is_pinned):
            return args[0] if func is torch.Tensor.pin_memory else False  # pinned memory needs a real CUDA driver
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            gen = kwargs.get("generator")
            if gen is not None and gen.device.type != "cuda":
                raise RuntimeError(f"Expected a 'cuda' device type for generator but found '{gen.device.type}' "
                                   f"(simulated CUDA: {getattr(func, '__name__', func)})")
            kwargs = {**kwargs, "device": "cpu"}
            out = _on_device_rng(lambda: func(*args, **kwargs)) if gen is None else func(*args, **kwargs)
            return tree_map(lambda x: to_device(x) if isinstance(x, torch.Tensor) else x, out)
        return func(*args, **kwargs)


def _touches_device(args, kwargs) -> bool:
    flat, _ = tree_flatten((args, kwargs))
    return any(isinstance(x, SimTensor) for x in flat)


class _Autocast(torch.amp.autocast):
    """``torch.autocast("cuda", ...)`` as CPU autocast: the device's mixed precision on the host.
    It applies to ops on device tensors only (`_SimMode` switches it off for host-only ops, as
    CUDA autocast leaves the CPU alone)."""

    depth = 0  # open CUDA autocast regions

    def __init__(self, device_type: str, *args, **kwargs):
        self.mapped = device_type == "cuda"
        super().__init__("cpu" if self.mapped else device_type, *args, **kwargs)

    def __enter__(self):
        if self.mapped:
            _Autocast.depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        if self.mapped:
            _Autocast.depth -= 1
        return super().__exit__(*exc)


class _Event:
    """torch.cuda.Event: host time at record(); elapsed_time in milliseconds."""

    def __init__(self, enable_timing: bool = False, **_):
        self.t = None

    def record(self, stream=None) -> None:
        import time

        self.t = time.perf_counter()

    def synchronize(self) -> None:
        _sync("event.synchronize")

    def elapsed_time(self, end: "_Event") -> float:  # of completed events (after a synchronize): no wait
        return (end.t - self.t) * 1000.0

    def query(self) -> bool:
        return True


def _grouping(original):
    """torch groups tensors for its multi-tensor kernels by their C++ device, which is the host
    for simulated tensors; the group of device tensors is keyed by the device they present."""

    def group(tensorlistlist, with_indices=False):
        out = original(tensorlistlist, with_indices)
        fixed = {}
        for (device, dtype), value in out.items():
            first = next((t for lst in value[0] for t in lst if isinstance(t, torch.Tensor)), None)
            fixed[(CUDA if isinstance(first, SimTensor) else device, dtype)] = value
        return fixed

    return group


def _all_reduce(tensor, op=None, group=None, async_op=False):
    if not isinstance(tensor, SimTensor):
        raise RuntimeError("No backend type associated with device type cpu (simulated NCCL: all_reduce of a host tensor)")
    world = STATE.world if STATE is not None else 1
    tensor.mul_(world)  # `world` identical ranks: the sum of their equal values
    return None


def _all_gather_object(out: list, obj, group=None) -> None:
    for i in range(len(out)):
        out[i] = obj


@contextlib.contextmanager
def simulated_cuda(world: int = 1, seed: int = 0):
    """Run the enclosed code against the simulated CUDA device; yields the `SimState`
    (``state.syncs`` counts host synchronisations per call site)."""
    global STATE
    import torch.distributed as dist

    state = SimState(world=world)
    state.rng = torch.Generator().manual_seed(seed).get_state()

    def seed_device(s: int) -> None:
        with state.lock:
            state.rng = torch.Generator().manual_seed(int(s)).get_state()

    def set_rng_state_all(states) -> None:
        (only,) = states
        state.rng = only.clone()

    def synchronize(device=None) -> None:
        _sync("torch.cuda.synchronize")

    patches = {
        (torch.cuda, "is_available"): lambda: True,
        (torch.cuda, "device_count"): lambda: 1,
        (torch.cuda, "current_device"): lambda: 0,
        (torch.cuda, "get_device_name"): lambda device=None: "Simulated CUDA (CPU)",
        (torch.cuda, "get_device_capability"): lambda device=None: (9, 0),
        (torch.cuda, "get_device_properties"): lambda device=None: SimpleNamespace(
            name="Simulated CUDA (CPU)", total_memory=80 * 2**30, major=9, minor=0, multi_processor_count=132),
        (torch.cuda, "set_device"): lambda device: None,
        (torch.cuda, "is_bf16_supported"): lambda *a, **k: True,
        (torch.cuda, "synchronize"): synchronize,
        (torch.cuda, "manual_seed"): seed_device,
        (torch.cuda, "manual_seed_all"): seed_device,
        (torch.cuda, "get_rng_state"): lambda device="cuda": state.rng.clone(),
        (torch.cuda, "set_rng_state"): lambda new, device="cuda": set_rng_state_all([new]),
        (torch.cuda, "get_rng_state_all"): lambda: [state.rng.clone()],
        (torch.cuda, "set_rng_state_all"): set_rng_state_all,
        (torch.cuda, "empty_cache"): lambda: None,
        (torch.cuda, "max_memory_allocated"): lambda device=None: 0,
        (torch.cuda, "reset_peak_memory_stats"): lambda device=None: None,
        (torch.cuda, "Event"): _Event,
        (torch, "autocast"): _Autocast,
        (torch.amp, "autocast"): _Autocast,
        (torch._C, "_group_tensors_by_device_and_dtype"): _grouping(torch._C._group_tensors_by_device_and_dtype),
        (dist, "all_reduce"): _all_reduce,
        (dist, "all_gather_object"): _all_gather_object,
    }
    saved = {key: getattr(*key) for key in patches}
    swap = torch.__future__.get_swap_module_params_on_conversion()
    STATE = state
    try:
        for (obj, name), value in patches.items():
            setattr(obj, name, value)
        torch.__future__.set_swap_module_params_on_conversion(True)
        with _SimMode():
            yield state
    finally:
        for (obj, name), value in saved.items():
            setattr(obj, name, value)
        torch.__future__.set_swap_module_params_on_conversion(swap)
        STATE = None


def on_device(x) -> bool:
    """Whether every tensor in ``x`` (nested) is a simulated device tensor."""
    flat, _ = tree_flatten(x)
    return all(isinstance(t, SimTensor) for t in flat if isinstance(t, torch.Tensor))


def host(x):
    """``x`` (nested) with device tensors copied to plain CPU tensors, for comparisons."""
    return tree_map(lambda t: t.elem.detach().clone() if isinstance(t, SimTensor) else t, x)


if __name__ == "__main__":  # pragma: no cover - a quick look
    with simulated_cuda() as s:
        a = torch.randn(3, device="cuda")
        print(a, float(a.sum()), dict(s.syncs.sites), file=sys.stdout)
