"""Shared by the benchmark scripts: the machine description and appending to docs/benchmarks.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
from pathlib import Path

import psutil

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def today() -> str:
    return dt.datetime.now().strftime("%Y-%m-%d %H:%M")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def report(title: str, lines: list[str]) -> None:
    """Print a bench script's section and append it to docs/benchmarks.md."""
    text = "\n".join(lines)
    print(text)
    append(title, text)


def append(title: str, body: str) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    if not DOC.exists():
        DOC.write_text("# Benchmarks\n\nAppended by `make bench` (bench/*.py). Each section names its machine and date.\n")
    with DOC.open("a") as fh:
        fh.write(f"\n## {title} — {today()}\n\nMachine: {machine()}\n\n{body.rstrip()}\n")
    print(f"appended '{title}' to {DOC}")
