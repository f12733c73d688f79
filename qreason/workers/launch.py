"""Run the quantization worker in the quantization environment, as a subprocess.

The worker (``qreason.workers.quantize``) needs llm-compressor, whose pins clash with vLLM's, so it runs with
the Python of ``.venv-quant`` (made by ``scripts/setup-quant-env.sh``). This module finds that interpreter,
starts the worker in its own process group, shows the worker's progress lines as they come, writes everything
it prints to a log file, and measures the child's wall time and peak memory (``ru_maxrss`` from ``wait4``).
A failure becomes one ``QuantizeFailed`` line that names the log; Ctrl-C stops the worker before it is
re-raised.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qreason.errors import UserError
from qreason.workers.protocol import ERROR_PREFIX, PROGRESS_PREFIX

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the qreason package
# In a source checkout (the usual case) the quantization environment sits in the repository.
IS_CHECKOUT = (PACKAGE_ROOT / "pyproject.toml").is_file()
DEFAULT_VENV = (PACKAGE_ROOT if IS_CHECKOUT else Path.cwd()) / ".venv-quant"


class QuantizeFailed(UserError):
    """The worker ran and failed: reported as one line, with the log's path for the details."""


@dataclass
class WorkerRun:
    result: dict  # what the worker wrote to its result file
    seconds: float  # wall time of the subprocess
    peak_memory_mb: float  # the subprocess's peak resident memory
    cpu_seconds: float  # user + system CPU time of the subprocess (less sensitive to a busy machine)


def quant_python() -> Path:
    """The quantization environment's interpreter: $QREASON_QUANT_PYTHON, else .venv-quant in the repo."""
    configured = os.environ.get("QREASON_QUANT_PYTHON")
    python = Path(configured) if configured else DEFAULT_VENV / "bin" / "python"
    if not python.is_file():
        raise UserError(
            "quantization environment",
            f"{python} not found; create it with scripts/setup-quant-env.sh (or set QREASON_QUANT_PYTHON)",
        )
    return python


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the worker's process group, then kill it if it does not stop within 10 s."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_worker(
    job: dict,
    job_dir: Path,
    log_path: Path,
    label: str,
    echo: Callable[[str], None],
    python: Path | None = None,
    module: str = "qreason.workers.quantize",
    stage: str = "quantize",
) -> WorkerRun:
    """Run one job to completion; ``echo`` receives the worker's progress lines. ``python`` and ``module``:
    another side environment's worker speaking the same protocol (the recover stage's training worker);
    ``stage`` names it in errors."""
    python = python or quant_python()
    job_file = job_dir / "job.json"
    result_file = job_dir / "result.json"
    job_file.write_text(json.dumps({**job, "result_file": str(result_file)}, indent=2), encoding="utf-8")
    env = dict(os.environ)
    if (
        IS_CHECKOUT
    ):  # the worker runs this checkout's code even where .venv-quant has no editable install of it
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    env.update({"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"})
    start = time.monotonic()
    error: str | None = None
    proc = subprocess.Popen(
        [str(python), "-m", module, str(job_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    )
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            for line in proc.stdout:
                log.write(line)
                text = line.rstrip("\n")
                if text.startswith(PROGRESS_PREFIX):
                    echo(text[len(PROGRESS_PREFIX) :])
                elif text.startswith(ERROR_PREFIX):
                    error = text[len(ERROR_PREFIX) :]
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    except BaseException:
        _stop(proc)
        raise
    finally:
        proc.stdout.close()
    seconds = time.monotonic() - start
    if proc.returncode != 0 or not result_file.is_file():
        if error:
            reason = error
        elif proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            reason = f"the worker was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        else:
            reason = f"the worker exited with code {proc.returncode}"
        raise QuantizeFailed(f"{stage} {label}", f"{reason} (full log: {log_path})")
    result = json.loads(result_file.read_text(encoding="utf-8"))
    job_file.unlink(missing_ok=True)
    result_file.unlink(missing_ok=True)
    return WorkerRun(
        result=result,
        seconds=seconds,
        peak_memory_mb=usage.ru_maxrss / 1024,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
    )
