"""Provenance of a run: package versions, the code's git commit, peak memory, threads."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = (
    "atp-compress", "torch", "transformers", "accelerate", "safetensors", "gguf", "tokenizers", "numpy", "pydantic",
    "lm-eval", "gptqmodel", "optimum", "bitsandbytes",
)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> dict[str, object]:
    """Commit of the atp-compress source tree, and whether it had uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far. Linux: VmHWM, the high-water mark of this
    process's own memory map; ru_maxrss is not usable there, as it carries over across exec
    the parent's peak at fork (a run started from a 700 MB process would read at least 700 MB)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, elsewhere an estimate


def memory_bytes() -> int | None:
    """Memory this machine can give a run: MemAvailable on Linux, else all physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> dict[str, object]:
    return {"platform": platform.platform(), "processor": platform.machine(), "torch_threads": torch.get_num_threads()}
