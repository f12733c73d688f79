"""The executors: the same matrix through a local Ray instance (CPU) and through the local executor gives the
same records; a Ray engine worker killed with SIGKILL mid-run loses and duplicates nothing; the config
forms."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, has_vllm, write_config

from qreason.config.schema import parse_config
from qreason.engines import GenerationRequest
from qreason.errors import UserError
from qreason.pipeline.executor import _batches, shipped_env

QUANT_PYTHON = REPO / ".venv-quant" / "bin" / "python"


def test_executor_config_forms():
    base = "name: x\ntasks: [{name: synthetic}]\n"
    assert parse_config(base, "c.yaml").executor.kind == "local"
    cfg = parse_config(base + "executor: ray\n", "c.yaml")
    assert cfg.executor.kind == "ray" and cfg.executor.max_retries == 3 and cfg.executor.address is None
    cfg = parse_config(
        base + "executor: {kind: ray, address: 'ray://head:10001', gpus_per_generate: 2}\n", "c.yaml"
    )
    assert cfg.executor.address == "ray://head:10001" and cfg.executor.gpus_per_generate == 2
    with pytest.raises(UserError, match=r"c.yaml:3: executor.kind: Input should be 'local' or 'ray'"):
        parse_config(base + "executor: dask\n", "c.yaml")


def test_workers_get_paths_and_offline_settings_but_never_credentials(monkeypatch):
    monkeypatch.setenv("QREASON_CACHE", "/shared/cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("QREASON_JUDGE_API_KEY", "sk-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    env = shipped_env()
    assert env["QREASON_CACHE"] == "/shared/cache" and env["HF_HUB_OFFLINE"] == "1"
    assert "sk-secret" not in env.values() and "hf_secret" not in env.values()


def test_a_job_bigger_than_the_local_ray_instance_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = write_config(
        tmp_path / "c.yaml",
        f"""
name: x
output_dir: {tmp_path / "out"}
tasks: [{{name: synthetic, limit: 2}}]
backend: {{kind: openai, base_url: "http://127.0.0.1:9/v1", model: m}}
executor: {{kind: ray, local_cpus: 1, cpus_per_job: 2}}
""",
    )
    result = subprocess.run(
        [sys.executable, "-m", "qreason.cli", "run", str(cfg)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "executor.cpus_per_job: a job needs 2 CPUs but the local Ray instance has 1" in result.stderr
    assert not (tmp_path / "out").exists()


def _req(i: int, fp: str, cont: bool = False) -> GenerationRequest:
    messages = [{"role": "user", "content": str(i)}] + (
        [{"role": "assistant", "content": "so"}] if cont else []
    )
    return GenerationRequest(
        key=f"{fp}{i}{cont}",
        variant=fp,
        model_fingerprint=fp,
        task="t",
        problem_id=str(i),
        messages=messages,
        seed=0,
    )


def test_ray_batches_are_the_local_engines_batches():
    """Same batches as the local engine (consecutive per model), so results match; never mixed models or
    kinds."""
    reqs = [_req(i, "a") for i in range(5)] + [_req(i, "b") for i in range(3)] + [_req(9, "a", cont=True)]
    batches = _batches(reqs, 2)
    assert [[r.key for r in b] for b in batches] == [
        ["a0False", "a1False"],
        ["a2False", "a3False"],
        ["a4False"],
        ["b0False", "b1False"],
        ["b2False"],
        ["a9True"],
    ]


# ---------------------------------------------------------------------------------------- real Ray on CPU

needs_engine = pytest.mark.skipif(not has_vllm(), reason="vLLM is not installed")
needs_quant = pytest.mark.skipif(not QUANT_PYTHON.is_file(), reason=".venv-quant not found")


def matrix_config(path: Path, model: str, executor: str, out: Path, limit: int = 6, extra: str = "") -> Path:
    return write_config(
        path,
        f"""
name: matrix
output_dir: {out}
model: {{path: {model}}}
quantize:
  - {{method: rtn-w4a16, overrides: {{group_size: 64}}}}
tasks:
  - {{name: synthetic, limit: {limit}, params: {{ops: [add, sub], min_steps: 1, max_steps: 2}}}}
sampling: {{max_tokens: 40, seeds: [0]}}
backend: {{max_model_len: 1024, batch_size: 4}}
executor: {executor}
curate: {{enabled: false}}
report: {{enabled: false}}
{extra}""",
    )


def by_cell(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    return {(r["variant"], r["problem_id"], r["seed"]): r["text"] for r in rows}


@pytest.mark.vllm
@needs_engine
@needs_quant
def test_ray_and_local_executors_give_the_same_results(default_model, tmp_path, monkeypatch):
    from qreason.pipeline.runner import run

    monkeypatch.setenv("QREASON_CACHE", str(tmp_path / "cache"))  # the RTN checkpoint is made by a Ray task
    # on a CPU-only cluster each engine actor takes a whole node (both CPUs here): the second model's engine
    # can only start once the first is released
    ray_cfg = matrix_config(
        tmp_path / "ray.yaml", default_model.path, "{kind: ray, local_cpus: 2}", tmp_path / "ray"
    )
    on_ray = run(ray_cfg)
    assert on_ray.executor == "ray" and on_ray.quantization.quantized == 1
    assert on_ray.generations.model_dump() == {
        **on_ray.generations.model_dump(),
        "planned": 12,
        "produced": 12,
        "failed": 0,
    }
    local = run(matrix_config(tmp_path / "local.yaml", default_model.path, "local", tmp_path / "local"))
    assert local.executor == "local" and local.quantization.reused == 1
    assert by_cell(tmp_path / "ray") == by_cell(tmp_path / "local")
    assert len(by_cell(tmp_path / "ray")) == 12  # greedy: one seed (a second repeats the same texts)
    assert on_ray.results == local.results
    backends = {json.loads(line)["backend"] for line in (tmp_path / "ray" / "generations.jsonl").open()}
    assert backends == {
        json.loads(line)["backend"] for line in (tmp_path / "local" / "generations.jsonl").open()
    }
    assert len(backends) == 1 and backends.pop().startswith("vllm")


def engine_actor_pids() -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::EngineActor"):
            pids.append(proc.pid)
    return pids


@pytest.mark.vllm
@needs_engine
def test_killing_a_ray_engine_worker_loses_and_duplicates_nothing(default_model, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "kill.yaml",
        f"""
name: kill
output_dir: {out}
model: {{path: {default_model.path}}}
tasks: [{{name: synthetic, limit: 20}}]
sampling: {{max_tokens: 48}}
backend: {{max_model_len: 1024, batch_size: 4}}
executor: {{kind: ray, local_cpus: 2, cpus_per_job: 2}}
curate: {{enabled: false}}
report: {{enabled: false}}
""",
    )
    log = open(tmp_path / "run.out", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qreason.cli", "run", str(cfg)], stdout=log, stderr=subprocess.STDOUT
    )
    killed = None
    try:
        deadline = time.monotonic() + 300
        gens = out / "generations.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if gens.exists() and 0 < len(gens.read_text().splitlines()) < 20:
                pids = engine_actor_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed = len(gens.read_text().splitlines())
                    break
            time.sleep(0.2)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "run.out").read_text()
    assert killed is not None, "the run finished before a worker could be killed"
    assert proc.returncode == 0, output[-3000:]
    keys = [json.loads(line)["key"] for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(keys) == 20 and not [k for k, n in Counter(keys).items() if n > 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generations"]["failed"] == 0 and summary["generations"]["produced"] == 20


CLUSTER = """
import sys, time, ray
ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # up until the test closes stdin
"""


def test_a_running_ray_cluster_from_ray_address(tmp_path, monkeypatch):
    """A cluster started apart from qreason (by another process), found through $RAY_ADDRESS: the jobs run on
    it (engine actors with the OpenAI-compatible backend against a scripted endpoint), the records come back
    to the run store, and the cluster is still up afterwards (qreason only disconnects from a cluster it did
    not start)."""
    from fault_server import FaultServer

    from qreason.pipeline.runner import run

    cluster = subprocess.Popen(
        [sys.executable, "-c", CLUSTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        address = cluster.stdout.readline().strip()
        assert address, "the Ray cluster did not start"
        monkeypatch.setenv("RAY_ADDRESS", address)
        # Ray clusters use token authentication; a client naming an address must ask for it (the token is in
        # ~/.ray/auth_token, written by the cluster)
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        with FaultServer([]) as server:
            cfg = write_config(
                tmp_path / "c.yaml",
                f"""
name: on-cluster
output_dir: {tmp_path / "out"}
tasks: [{{name: synthetic, limit: 5}}]
sampling: {{max_tokens: 32, seeds: [0, 1]}}
backend: {{kind: openai, base_url: "{server.base_url}", model: m, max_retries: 0}}
executor: ray
curate: {{enabled: false}}
report: {{enabled: false}}
""",
            )
            summary = run(cfg)
        assert summary.executor == "ray"
        assert summary.generations.produced == 10 and summary.generations.failed == 0
        assert len((tmp_path / "out" / "generations.jsonl").read_text().splitlines()) == 10
        assert cluster.poll() is None  # the cluster qreason connected to is still running
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import ray; ray.init(address='{address}'); print(ray.cluster_resources()['CPU'])",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.returncode == 0 and probe.stdout.strip().endswith("2.0"), probe.stderr[-2000:]
    finally:
        cluster.stdin.close()
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            cluster.kill()
