"""What Ray workers receive (issue 11, item 14): nothing that looks like a credential in the job-wide
environment, and the endpoint key named by ``api_key_env`` only where the OpenAI backend needs it, on a
cluster started apart from the driver (whose workers do not inherit the driver's environment)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import write_config
from fault_server import FaultServer

from qreason.pipeline.executor import shipped_env

KEY = "sk-qreason-test-7f3a"


def test_worker_environment_drops_anything_that_looks_like_a_credential(monkeypatch):
    monkeypatch.setenv("QREASON_CACHE", "/shared/cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/hf")
    monkeypatch.setenv("QREASON_AUTH", "Basic dXNlcjpwdw==")
    monkeypatch.setenv("QREASON_DB_PASSWD", "hunter2")
    monkeypatch.setenv("VLLM_CREDENTIALS", "c")
    monkeypatch.setenv("HF_PROXY_URL", "http://user:pw@proxy:3128")
    env = shipped_env()
    assert env["QREASON_CACHE"] == "/shared/cache" and env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_ENDPOINT"] == "https://mirror.example/hf"
    for name in ("QREASON_AUTH", "QREASON_DB_PASSWD", "VLLM_CREDENTIALS", "HF_PROXY_URL"):
        assert name not in env
    monkeypatch.setenv("HF_ENDPOINT", "https://alice:s3cret@mirror.example/hf")
    assert "HF_ENDPOINT" not in shipped_env()


CLUSTER = """
import sys, ray
ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
"""


def test_the_endpoint_key_reaches_engine_actors_on_a_separate_cluster(tmp_path, monkeypatch):
    from qreason.pipeline.runner import run

    cluster_env = {k: v for k, v in os.environ.items() if k != "MY_ENDPOINT_KEY"}
    cluster = subprocess.Popen(
        [sys.executable, "-c", CLUSTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**cluster_env, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        address = cluster.stdout.readline().strip()
        assert address, "the Ray cluster did not start"
        monkeypatch.setenv("RAY_ADDRESS", address)
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("MY_ENDPOINT_KEY", KEY)  # the driver has it; the cluster's workers do not
        with FaultServer([]) as server:
            cfg = write_config(
                tmp_path / "c.yaml",
                f"""
name: keyed
output_dir: {tmp_path / "out"}
tasks: [{{name: synthetic, limit: 3}}]
sampling: {{max_tokens: 32}}
backend: {{kind: openai, base_url: "{server.base_url}", model: m, max_retries: 0,
          api_key_env: MY_ENDPOINT_KEY}}
executor: ray
curate: {{enabled: false}}
report: {{enabled: false}}
""",
            )
            summary = run(cfg)
            auth = {r["authorization"] for r in server.requests}
        assert summary.generations.produced == 3, summary.generations
        assert auth == {f"Bearer {KEY}"}
        for path in (tmp_path / "out").rglob("*"):
            if path.is_file():
                assert KEY not in path.read_text(errors="replace"), path
    finally:
        cluster.stdin.close()
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            cluster.kill()
