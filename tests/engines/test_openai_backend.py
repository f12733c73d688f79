"""The OpenAI-compatible generation backend: against a real vLLM server, and against injected faults."""

import json

import pytest
from conftest import write_config
from fault_server import FaultServer

from qreason.pipeline.runner import run


def endpoint_config(tmp_path, base_url: str, n: int = 4, seeds: str = "[0]", timeout_s: float = 2) -> str:
    return write_config(
        tmp_path / "run.yaml",
        f"""
name: ep
output_dir: out
model: {{path: smollm2}}
tasks: [{{name: synthetic, limit: {n}}}]
sampling: {{max_tokens: 48, seeds: {seeds}}}
backend: {{kind: openai, base_url: "{base_url}", model: smollm2, concurrency: 3, max_retries: 3,
           timeout_s: {timeout_s}, api_key_env: QREASON_TEST_KEY}}
""",
    )


@pytest.mark.server
def test_real_server_generates_grades_and_caches(openai_server, tmp_path):
    cfg = endpoint_config(tmp_path, openai_server, n=4, seeds="[0, 1]", timeout_s=300)
    first = run(cfg)
    assert first.generations.produced == 8 and first.generations.failed == 0
    gens = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert all(
        g["text"] and g["completion_tokens"] > 0 and g["finish_reason"] in {"stop", "length"} for g in gens
    )
    assert {g["backend"] for g in gens} == {f"openai-compatible:{openai_server}"}
    assert sum(first.results[0].outcomes.values()) == 8
    second = run(cfg)
    assert second.generations.produced == 0 and second.generations.cached == 8


def test_retries_429_500_drops_and_timeouts_then_succeeds(tmp_path, monkeypatch):
    monkeypatch.setenv("QREASON_TEST_KEY", "sk-secret-test-key")
    with FaultServer(["429", "500", "drop", "slow", "malformed"], slow_seconds=4) as server:
        summary = run(endpoint_config(tmp_path, server.base_url, n=3))
        assert summary.generations.produced == 3 and summary.generations.failed == 0
        assert sum(summary.results[0].outcomes.values()) == 3
        assert len(server.requests) >= 3 + 4  # every fault was retried
        assert server.requests[0]["authorization"] == "Bearer sk-secret-test-key"
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert "sk-secret-test-key" not in path.read_text(errors="replace"), path


def test_permanent_failure_is_reported_not_stored_and_retried_next_time(tmp_path):
    with FaultServer([], default="500") as server:
        summary = run(endpoint_config(tmp_path, server.base_url, n=2))
    assert summary.generations.model_dump() == {
        **summary.generations.model_dump(),
        "produced": 0,
        "failed": 2,
    }
    assert not (tmp_path / "out" / "generations.jsonl").exists()
    with FaultServer([]) as server:
        again = run(endpoint_config(tmp_path, server.base_url, n=2))
    assert again.generations.produced == 2 and again.generations.failed == 0
