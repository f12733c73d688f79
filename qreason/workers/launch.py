"""The one launcher of side-environment workers (quantization, training, lm-eval).

Each side environment pins libraries that clash with the main one (llm-compressor, TRL/PEFT, lm-eval), so its
worker runs as ``python -m MODULE JOB.json`` with that environment's interpreter (``SideEnv.python``: an
explicit path, else ``$QREASON_<NAME>_PYTHON``, else ``.venv-<name>`` in a source checkout, else
``$QREASON_CACHE/envs/<name>``, where ``qreason setup`` puts it; ``workers.envs`` makes them).
``run_worker`` writes the job, starts the worker in its own process group (killed when qreason dies, see
``qreason.children``), streams its output into a log (progress lines go to ``echo``, every line to
``on_line``), measures its wall time, CPU time and peak memory, and stops the whole group when the caller is
interrupted (Ctrl-C: within seconds, from whichever thread got it; see ``qreason.children``). A worker that
fails raises ``WorkerFailed``: one line naming the log; not the user's input, so the CLI exits with 1.
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

from qreason.children import INTERRUPT_GRACE_S, check_stopping, die_with_parent, stop_group, track, untrack
from qreason.errors import UserError
from qreason.workers.protocol import ERROR_PREFIX, PROGRESS_PREFIX

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the qreason package
# In a source checkout (the usual case) the side environments sit in the repository.
IS_CHECKOUT = (PACKAGE_ROOT / "pyproject.toml").is_file()


class WorkerFailed(Exception):
    """A worker ran and failed (not bad input): one line naming the log that holds the details."""

    exit_code = 1

    def __init__(self, where: str, message: str):
        self.where, self.message = where, message
        super().__init__(f"{where}: {message}")


def envs_home() -> Path:
    """Where ``qreason setup`` puts the side environments of an installed qreason: ``$QREASON_ENVS``, else
    ``$QREASON_CACHE/envs``, else ``~/.cache/qreason/envs``."""
    if os.environ.get("QREASON_ENVS"):
        return Path(os.environ["QREASON_ENVS"])
    return Path(os.environ.get("QREASON_CACHE", Path.home() / ".cache" / "qreason")) / "envs"


def setup_command(name: str) -> str:
    """The one command that creates the side environment ``name``."""
    return "make env" if IS_CHECKOUT else f"qreason setup {name}"


@dataclass(frozen=True)
class SideEnv:
    """A side environment: its name (``quant`` -> ``.venv-quant``, ``$QREASON_QUANT_PYTHON``) and what it is
    for (``workers.envs`` knows how to build it)."""

    name: str
    purpose: str

    @property
    def variable(self) -> str:
        return f"QREASON_{self.name.upper()}_PYTHON"

    @property
    def default_dir(self) -> Path:
        """Where ``qreason setup`` puts it: ``.venv-NAME`` in a source checkout, else ``envs_home()/NAME``."""
        return PACKAGE_ROOT / f".venv-{self.name}" if IS_CHECKOUT else envs_home() / self.name

    def candidates(self, configured: str | None = None) -> list[Path]:
        """The interpreters looked for, in order: ``configured``, the environment variable, the checkout's
        ``.venv-NAME``, then ``envs_home()/NAME`` (the first two, when set, are the only choice)."""
        chosen = configured or os.environ.get(self.variable)
        if chosen:
            return [Path(chosen)]
        dirs = [PACKAGE_ROOT / f".venv-{self.name}"] if IS_CHECKOUT else []
        return [d / "bin" / "python" for d in dirs + [envs_home() / self.name]]

    def find(self, configured: str | None = None) -> Path | None:
        return next((p for p in self.candidates(configured) if p.is_file()), None)

    def python(self, configured: str | None = None) -> Path:
        """The interpreter (see ``candidates``); a missing one is bad setup, reported with its fix."""
        python = self.find(configured)
        if python is None:
            looked = " or ".join(str(p) for p in self.candidates(configured))
            raise UserError(
                f"{self.purpose} environment",
                f"{looked} not found; create it with `{setup_command(self.name)}` "
                f"(or point {self.variable} at its python)",
            )
        return python


QUANT = SideEnv("quant", "quantization")
TRAIN = SideEnv("train", "training")
BENCH = SideEnv("bench", "lm-eval")
SIDE_ENVS = (QUANT, TRAIN, BENCH)


def side_env_vars(drop: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment a worker starts with: this process's, less ``drop``, with this checkout first on the
    path (the running qreason, even where the side environment links another checkout's) and no progress
    bars or tokenizer threads. The working directory never goes on the worker's path (``PYTHONSAFEPATH``): a
    ``qreason/`` directory there must not shadow the installed qreason."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if IS_CHECKOUT:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "TQDM_DISABLE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONSAFEPATH": "1",
        }
    )
    return env


@dataclass
class WorkerRun:
    result: dict  # what the worker wrote to its result file ({} for a worker that streams its results)
    returncode: int
    seconds: float  # wall time of the subprocess
    peak_memory_mb: float  # the subprocess's peak resident memory
    cpu_seconds: float  # user + system CPU time of the subprocess (less sensitive to a busy machine)


STOP_GRACE_S = 10.0  # a worker stopped because qreason failed gets this long to exit after SIGTERM


def run_worker(
    job: dict,
    job_dir: Path,
    log_path: Path,
    label: str,
    echo: Callable[[str], None],
    *,
    python: Path,
    module: str,
    stage: str,
    env: dict[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    check: bool = True,
    args: tuple[str, ...] = (),
) -> WorkerRun:
    """Run one job to completion. ``stage`` and ``label`` name it in errors; ``check``: a failed worker raises
    ``WorkerFailed`` (a worker that reports failures line by line, as lm-eval's does, passes False and reads
    ``returncode``). ``env``: the worker's environment (default ``side_env_vars()``)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    job_file = job_dir / "job.json"
    result_file = job_dir / "result.json"
    job_file.write_text(json.dumps({**job, "result_file": str(result_file)}, indent=2), encoding="utf-8")
    start = time.monotonic()
    error: str | None = None
    check_stopping()  # an interrupt is stopping the workers: start none
    proc = subprocess.Popen(
        [str(python), "-m", module, *args, str(job_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env or side_env_vars(),
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    track(proc)  # an interrupt in another thread stops it at once (children.stop_on_interrupt)
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                text = line.rstrip("\n")
                if text.startswith(PROGRESS_PREFIX):
                    echo(text[len(PROGRESS_PREFIX) :])
                elif text.startswith(ERROR_PREFIX):
                    error = text[len(ERROR_PREFIX) :]
                if on_line is not None:
                    on_line(text)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # an interrupt's stop (children.stop_tracked) reaped it first
            usage = None
            proc.wait()
    except BaseException as exc:
        # Ctrl-C must take effect within seconds: a worker busy in a library gets a short grace
        stop_group(proc, INTERRUPT_GRACE_S if isinstance(exc, KeyboardInterrupt) else STOP_GRACE_S)
        raise
    finally:
        untrack(proc)
        proc.stdout.close()
    seconds = time.monotonic() - start
    if check and (proc.returncode != 0 or not result_file.is_file()):
        if error:
            reason = error
        elif proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            reason = f"the worker was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        else:
            reason = f"the worker exited with code {proc.returncode}"
        raise WorkerFailed(f"{stage} {label}", f"{reason} (full log: {log_path})")
    result = json.loads(result_file.read_text(encoding="utf-8")) if result_file.is_file() else {}
    job_file.unlink(missing_ok=True)
    result_file.unlink(missing_ok=True)
    return WorkerRun(
        result=result,
        returncode=proc.returncode,
        seconds=seconds,
        peak_memory_mb=usage.ru_maxrss / 1024 if usage else 0.0,
        cpu_seconds=usage.ru_utime + usage.ru_stime if usage else 0.0,
    )
