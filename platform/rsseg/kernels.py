"""The CPU kernel path (``runtime.cpu_kernels``): pinned, two x86 machines compute the same numbers.

Measured (docs/benchmarks.md, "Reproducibility across machines"): the smoke demo's pre-training
is bit-for-bit repeatable on one machine, but ATen, oneDNN and MKL pick their code by the CPU's
instruction set, and an AVX-512 CPU's sums come out in another order than an AVX2 CPU's. The
differences start in the last bits, grow through 1 200 steps of training, and the demo's Table 2
moved by 6-8 points (t = [0] 68.2 on this project's AVX-512 machine, 60.2 on another 2-core one)
— more than the ± of its seeds. With ``avx2`` every x86 CPU (AVX2 since 2013) runs the AVX2 code:
the AVX-512 machine pinned to it reproduced the other machine's published rows (15 of 16 cells
equal, one 0.1 apart).

The three variables are read when each library first computes (not at import), so `pin` sets them
in this process before any CPU kernel runs and checks ATen's choice; Ray workers started afterwards
inherit them (`rsseg.raycluster` forwards them to an existing cluster).
"""

from __future__ import annotations

import os

from rsseg.errors import ConfigError

PINNED: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
VARIABLES = tuple(sorted({k for env in PINNED.values() for k in env}))


def pin(kernels: str) -> None:
    """Set the kernel path of this process (and of the Ray workers it starts); a process whose
    CPU kernels already ran on another path cannot switch, and is refused in one line. On a CPU
    that has no such path (an ARM CPU, an x86 one without AVX2) a warning says the numbers are
    that CPU's own."""
    import platform

    import torch

    env = PINNED[kernels]
    for key, value in env.items():
        os.environ[key] = value
    if not env:
        return
    got = torch.backends.cpu.get_cpu_capability()
    if got.lower() == env["ATEN_CPU_CAPABILITY"]:
        return
    if platform.machine().lower() not in ("x86_64", "amd64") or got.upper() not in ("AVX512", "AVX2"):
        import logging

        logging.getLogger(__name__).warning("runtime.cpu_kernels: %s: this %s CPU has no %s kernels (torch uses %s); its "
                                            "numbers will differ from an x86 machine's", kernels, platform.machine(), kernels, got)
        return
    raise ConfigError(f"runtime.cpu_kernels: {kernels}: this process already computes with {got} kernels (they are chosen "
                      f"at the first CPU operation); start it with {' '.join(f'{k}={v}' for k, v in env.items())} "
                      "in the environment")
