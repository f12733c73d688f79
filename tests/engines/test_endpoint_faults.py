"""More fault injection (issue 11): replies of unexpected shape, refusals, a judge cut off by max_tokens,
Retry-After as a date and beyond two minutes, requests the endpoint refuses (400/401/403), a dripping body, a
huge body, lone surrogates, secrets echoed back, and a panel member that raises. The stages must never crash;
every failure is bounded, recorded (or reported once) and retried on the next run where that makes sense."""

from __future__ import annotations

import email.utils
import json
import logging
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import pytest
from fault_server import JsonServer
from judge_helpers import make_run

from qreason.config.schema import OpenAIConfig, SamplingConfig
from qreason.engines import GenerationRequest
from qreason.engines.openai import OpenAIBackend
from qreason.inputs.models import ResolvedModel
from qreason.records import Generation
from qreason.stages.generate import run_generation
from qreason.stages.judge import JudgeConfig, run_judging
from qreason.store import Table

SECRET = "sk-hostile-secret-0123456789"
GOOD = {
    "rationale": "Step 1 adds wrongly.",
    "first_error_step": 0,
    "error_type": "Execution",
    "sub_type": "computational_error",
    "capability": "numerical_computation",
}
SOLUTION = "Step 1: 2 + 2 = 4.\nThe final answer is \\boxed{4}."


class Hostile(JsonServer):
    """Each request carries FAULT:<marker> in its messages; the marker's script says what the n-th request
    with it gets (the last action repeats)."""

    def __init__(self, scripts: dict[str, list[str]], content: str):
        super().__init__()
        self.scripts = scripts
        self.content = content
        self.counts: Counter = Counter()
        self.times: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        marker = re.search(r"FAULT:(\w+)", json.dumps(body["messages"])).group(1)
        with self.lock:
            n = self.counts[marker]
            self.counts[marker] += 1
            self.times.setdefault(marker, []).append(time.monotonic())
        assert n < 20, "unbounded retries"
        script = self.scripts[marker]
        self.act(h, body, script[min(n, len(script) - 1)])

    def completion(self, choices, usage=True) -> dict:
        out = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": choices}
        if usage:
            out["usage"] = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        return out

    def choice(self, message, finish="stop") -> list:
        return [{"index": 0, "message": message, "finish_reason": finish}]

    def act(self, h, body, action: str) -> None:  # noqa: C901 - one branch per fault
        msg = {"role": "assistant", "content": self.content}
        if action == "ok":
            return self.reply(h, self.completion(self.choice(msg)))
        if action == "empty_choices":
            return self.reply(h, self.completion([]))
        if action == "no_choices":
            return self.reply(h, {"id": "x", "object": "chat.completion"})
        if action == "null_message":
            return self.reply(h, self.completion(self.choice(None)))
        if action == "no_message":
            return self.reply(h, self.completion([{"index": 0, "finish_reason": "stop"}]))
        if action == "int_content":
            return self.reply(h, self.completion(self.choice({"role": "assistant", "content": 42})))
        if action == "list_body":
            return self.reply(h, [1, 2, 3])
        if action == "html":
            return self.send(h, 200, b"<html><body>gateway says hi</body></html>", "text/html")
        if action == "refusal":
            return self.reply(
                h,
                self.completion(
                    self.choice(
                        {"role": "assistant", "content": None, "refusal": "I cannot help with grading this."}
                    )
                ),
            )
        if action == "length":
            return self.reply(
                h,
                self.completion(
                    self.choice(
                        {"role": "assistant", "content": '{"rationale": "Step 1 adds'}, finish="length"
                    )
                ),
            )
        if action == "surrogate":
            text = self.content.replace("2 + 2", "2 \ud800 + 2")
            return self.reply(h, self.completion(self.choice({"role": "assistant", "content": text})))
        if action == "retry_date":
            when = email.utils.formatdate(time.time() + 2, usegmt=True)
            return self.reply(h, {"error": {"message": "slow down"}}, 429, {"Retry-After": when})
        if action == "retry_long":
            return self.reply(h, {"error": {"message": "come back later"}}, 429, {"Retry-After": "300"})
        if action in ("400", "401", "403"):
            auth = h.headers.get("Authorization", "")
            return self.reply(h, {"error": {"message": f"refused; you sent {auth} to {h.path}"}}, int(action))
        if action == "drip":
            return self.drip(h)
        if action == "huge":
            big = self.completion(self.choice({"role": "assistant", "content": "7" * (40 << 20)}))
            return self.reply(h, big)
        raise ValueError(action)

    def reply(self, h, payload, status=200, headers=None) -> None:
        self.send(h, status, json.dumps(payload).encode(), headers=headers)

    def drip(self, h) -> None:
        payload = json.dumps(
            self.completion(self.choice({"role": "assistant", "content": self.content}))
        ).encode()
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            for b in payload:
                h.wfile.write(bytes([b]))
                h.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------- generation


def backend(url: str, **kw) -> OpenAIBackend:
    cfg = OpenAIConfig(
        base_url=url,
        model="m",
        api_key_env="QREASON_HOSTILE_KEY",
        concurrency=8,
        max_retries=kw.pop("max_retries", 2),
        timeout_s=kw.pop("timeout_s", 2.0),
        **kw,
    )
    return OpenAIBackend(cfg, ResolvedModel("m", "m", "fp", "endpoint"))


def requests_for(markers) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            key=f"k-{m}-{i}",
            variant="v",
            model_fingerprint="fp",
            task="t",
            problem_id=f"{m}{i}",
            messages=[{"role": "user", "content": f"FAULT:{m} what is 2 + 2?"}],
            seed=0,
        )
        for i, m in enumerate(markers)
    ]


GEN_SCRIPTS = {
    "ok": ["ok"],
    "empty_choices": ["empty_choices", "ok"],
    "no_choices": ["no_choices", "ok"],
    "null_message": ["null_message", "ok"],
    "no_message": ["no_message", "ok"],
    "int_content": ["int_content"],
    "list_body": ["list_body", "ok"],
    "html": ["html"],
    "refusal": ["refusal"],
    "surrogate": ["surrogate"],
}


def test_generation_survives_replies_of_any_shape(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QREASON_HOSTILE_KEY", SECRET)
    caplog.set_level(logging.INFO)
    markers = list(GEN_SCRIPTS)
    table = Table(tmp_path / "generations.jsonl", Generation)
    with Hostile(GEN_SCRIPTS, SOLUTION) as server:
        stats = run_generation(table, requests_for(markers), backend(server.base_url), SamplingConfig())
    by = {g.problem_id.rstrip("0123456789"): g for g in table.all()}
    # the malformed ones were retried here and then succeeded; what never became readable is reported, not
    # stored
    assert set(by) == {
        "ok",
        "empty_choices",
        "no_choices",
        "null_message",
        "no_message",
        "list_body",
        "refusal",
        "surrogate",
    }
    assert stats.failed == 2 and stats.produced == 8
    assert server.counts["int_content"] == 3 and server.counts["html"] == 3
    # a refusal is kept, as such
    assert (
        by["refusal"].text == "I cannot help with grading this." and by["refusal"].finish_reason == "refusal"
    )
    # a lone surrogate was replaced, and the whole batch was stored
    assert "\ud800" not in by["surrogate"].text and "\ufffd" in by["surrogate"].text
    assert SECRET not in caplog.text


def test_generation_stops_at_once_when_the_endpoint_refuses_the_request(tmp_path, monkeypatch, caplog):
    """401/403/400 are not retried and not reported once per item: one clear error for the run, with the key
    and the URL's secrets redacted."""
    from qreason.errors import UserError

    monkeypatch.setenv("QREASON_HOSTILE_KEY", SECRET)
    caplog.set_level(logging.INFO)
    for code in ("401", "403", "400"):
        table = Table(tmp_path / f"g{code}.jsonl", Generation)
        with Hostile({code: [code]}, SOLUTION) as server:
            url = server.base_url.replace("http://", f"http://user:{SECRET}@") + "?api-key=" + SECRET
            with pytest.raises(UserError) as err:
                run_generation(
                    table, requests_for([code] * 30), backend(url, max_retries=3), SamplingConfig()
                )
        msg = str(err.value)
        assert code in msg and "refused" in msg and len(msg.splitlines()) == 1
        assert SECRET not in msg
        assert server.counts[code] <= 8  # what was in flight when the first refusal came, nothing more
        assert caplog.text.count("generation failed") == 0
    assert SECRET not in caplog.text


def test_generation_deadline_huge_body_and_retry_after(tmp_path):
    scripts = {
        "drip": ["drip"],
        "huge": ["huge"],
        "retry_date": ["retry_date", "ok"],
        "retry_long": ["retry_long"],
    }
    table = Table(tmp_path / "generations.jsonl", Generation)
    with Hostile(scripts, SOLUTION) as server:
        t0 = time.monotonic()
        stats = run_generation(
            table,
            requests_for(scripts),
            backend(server.base_url, max_retries=1, timeout_s=1.0),
            SamplingConfig(),
        )
        elapsed = time.monotonic() - t0
    # the dripping body would take ~30 s per attempt; each attempt is cut at timeout_s
    assert elapsed < 20
    assert server.counts["drip"] == 2 and server.counts["huge"] == 2 and server.counts["retry_long"] == 1
    t = server.times["retry_date"]
    assert t[1] - t[0] >= 0.9  # the date was honoured
    assert {g.problem_id for g in table.all()} == {"retry_date2"}
    assert stats.failed == 3


def test_backend_name_has_no_secret(monkeypatch):
    monkeypatch.setenv("QREASON_HOSTILE_KEY", SECRET)
    b = backend(f"https://bob:{SECRET}@proxy.example/v1?api-key={SECRET}&region=eu")
    assert SECRET not in b.name and "bob" not in b.name and "proxy.example/v1" in b.name


# ---------------------------------------------------------------------------------------------- judge

JUDGE_SCRIPTS = {
    "ok": ["ok"],
    "empty_choices": ["empty_choices"],
    "no_choices": ["no_choices"],
    "null_message": ["null_message"],
    "no_message": ["no_message"],
    "int_content": ["int_content"],
    "list_body": ["list_body"],
    "html": ["html"],
    "refusal": ["refusal"],
    "length": ["length"],
    "surrogate": ["surrogate"],
    "retry_date": ["retry_date", "ok"],
    "retry_long": ["retry_long"],
    "drip": ["drip"],
    "huge": ["huge"],
    "fixed": ["null_message", "ok"],
}


def judge_spec(url: str, **kw) -> dict:
    return {
        "name": "hostile",
        "base_url": url,
        "model": "m",
        "api_key_env": "QREASON_HOSTILE_KEY",
        "concurrency": 16,
        "timeout_s": 1.0,
        "max_retries": 1,
        "invalid_retries": 1,
        "backoff_s": 0.01,
        **kw,
    }


def cases(markers):
    return [
        (
            f"{m}",
            f"FAULT:{m} Ana has 2 apples and buys 2 more. How many?",
            "4",
            {"q4": ("Step 1: 2 + 2 = 5.\nThe answer is \\boxed{5}.", "wrong")},
        )
        for m in markers
    ]


def test_judge_survives_every_hostile_reply(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QREASON_HOSTILE_KEY", SECRET)
    caplog.set_level(logging.INFO)
    markers = list(JUDGE_SCRIPTS)
    store = make_run(tmp_path / "run", cases(markers))
    with Hostile(JUDGE_SCRIPTS, json.dumps(GOOD).replace("wrongly", "wrongly \ud800")) as server:
        t0 = time.monotonic()
        spec = judge_spec(server.base_url, timeout_s=3.0)
        stats = run_judging(store, JudgeConfig.model_validate({"judges": [spec]}))
        assert time.monotonic() - t0 < 60
    got = {j.problem_id: j for j in store.judgments.all() if j.judge == "hostile"}
    assert set(got) == set(markers)
    ok = {m for m, j in got.items() if j.status == "ok"}
    assert ok == {"ok", "retry_date", "fixed", "surrogate"}
    assert "\ud800" not in got["surrogate"].rationale
    err = {m: j.error for m, j in got.items() if j.status != "ok"}
    assert "refus" in err["refusal"] and "I cannot help with grading this." in err["refusal"]
    assert "no choices" in err["empty_choices"]
    assert "max_tokens" in err["length"]
    assert "Timeout" in err["drip"]
    assert "MiB" in err["huge"]
    for m in ("null_message", "no_message", "int_content", "list_body", "html", "no_choices"):
        assert err[m], m
    assert server.counts["retry_long"] == 1  # Retry-After beyond two minutes: not waited for, not hammered
    assert stats.judges["hostile"]["ok"] + stats.judges["hostile"]["judge_error"] == len(markers)
    assert SECRET not in caplog.text and SECRET.encode() not in store.judgments.path.read_bytes()


@pytest.mark.parametrize("code", ["401", "403", "400"])
def test_judge_refused_by_the_endpoint_gives_one_error_not_one_record_per_item(tmp_path, monkeypatch, code):
    monkeypatch.setenv("QREASON_HOSTILE_KEY", SECRET)
    store = make_run(
        tmp_path / "run",
        cases([code] * 1 + [f"{code}"] * 0)
        + [(f"x{i}", f"FAULT:{code} q{i}", "4", {"q4": ("Step 1: 2 + 2 = 5.", "wrong")}) for i in range(20)],
    )
    with Hostile({code: [code]}, json.dumps(GOOD)) as server:
        url = server.base_url + f"?api-key={SECRET}"
        stats = run_judging(store, JudgeConfig.model_validate({"judges": [judge_spec(url, concurrency=2)]}))
    assert server.counts[code] <= 3
    assert [j for j in store.judgments.all() if j.judge == "hostile"] == []
    assert len(stats.errors) == 1
    assert code in stats.errors[0] and "hostile" in stats.errors[0] and SECRET not in stats.errors[0]
    assert stats.judges["hostile"]["judge_error"] == 0


def test_judge_cli_reports_a_refusing_endpoint_once(tmp_path, monkeypatch):
    import subprocess
    import sys

    from conftest import REPO

    store = make_run(
        tmp_path / "run",
        cases(["401"] * 1)
        + [(f"x{i}", f"FAULT:401 q{i}", "4", {"q4": ("Step 1: 2 + 2 = 5.", "wrong")}) for i in range(5)],
    )
    with Hostile({"401": ["401"]}, json.dumps(GOOD)) as server:
        spec = json.dumps(judge_spec(server.base_url))
        result = subprocess.run(
            [sys.executable, "-m", "qreason.cli", "judge", str(store.dir), "--judge", spec],
            capture_output=True,
            text=True,
            timeout=120,
            env={**__import__("os").environ, "PYTHONPATH": str(REPO), "QREASON_HOSTILE_KEY": SECRET},
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("refused the request") == 1 and "401" in result.stderr
    assert SECRET not in result.stderr + result.stdout


def test_endpoint_error_echoing_the_key_is_redacted_in_records(tmp_path, monkeypatch):
    """A 500 whose body echoes the Authorization header: retried, then recorded without the key."""
    monkeypatch.setenv("QREASON_HOSTILE_KEY", SECRET)

    class Echo(Hostile):
        def act(self, h, body, action):
            auth = h.headers.get("Authorization", "")
            return self.reply(h, {"error": {"message": f"upstream failed for {auth}"}}, 500)

    store = make_run(tmp_path / "run", cases(["echo"]))
    with Echo({"echo": ["x"]}, "") as server:
        run_judging(store, JudgeConfig.model_validate({"judges": [judge_spec(server.base_url)]}))
    rec = next(j for j in store.judgments.all() if j.judge == "hostile")
    assert rec.status == "judge_error" and "500" in rec.error and SECRET not in rec.error
    assert SECRET.encode() not in store.judgments.path.read_bytes()


def test_a_panel_member_that_raises_is_recorded_and_the_panel_goes_on(tmp_path, monkeypatch):
    from qreason.stages.judge.client import JudgeClient

    store = make_run(
        tmp_path / "run",
        [(f"p{i}", f"FAULT:ok q{i}", "4", {"q4": ("Step 1: 2 + 2 = 5.", "wrong")}) for i in range(2)],
    )
    real = JudgeClient.judge

    async def judge(self, req):
        if self.spec.name == "broken":
            raise RuntimeError("a bug in a judge client")
        return await real(self, req)

    monkeypatch.setattr(JudgeClient, "judge", judge)
    with Hostile({"ok": ["ok"]}, json.dumps(GOOD)) as server:
        cfg = JudgeConfig.model_validate(
            {"judges": [judge_spec(server.base_url, name="good"), judge_spec(server.base_url, name="broken")]}
        )
        stats = run_judging(store, cfg)
    assert stats.judges["good"]["ok"] == 2 and stats.judges["broken"]["judge_error"] == 2
    broken = [j for j in store.judgments.all() if j.judge == "broken"]
    assert len(broken) == 2 and all("RuntimeError" in j.error for j in broken)
    panels = [j for j in store.judgments.all() if j.judge == "panel"]
    assert len(panels) == 2 and all(p.status == "ok" and p.votes["n_valid"] == 1 for p in panels)


def test_run_against_a_refusing_endpoint_is_one_line_exit_2_and_leaks_nothing(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    class Refuse(Hostile):
        def handle(self, h, body):
            with self.lock:
                self.counts["all"] += 1
            self.act(h, body, "401")

    with Refuse({}, "") as server:
        cfg = tmp_path / "run.yaml"
        cfg.write_text(
            "name: ep\noutput_dir: out\nmodel: {path: smollm2}\ntasks: [{name: synthetic, limit: 12}]\n"
            "sampling: {max_tokens: 48}\n"
            f"backend: {{kind: openai, base_url: '{server.base_url}?key=${{QREASON_HOSTILE_KEY}}', "
            "model: smollm2, concurrency: 3, api_key_env: QREASON_HOSTILE_KEY}\n"
        )
        result = subprocess.run(
            [sys.executable, "-m", "qreason.cli", "run", str(cfg)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO), "QREASON_HOSTILE_KEY": SECRET},
        )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("qreason: error")]
    assert len(errors) == 1 and "401" in errors[0] and "refused" in errors[0]
    assert "generation failed" not in result.stderr
    assert server.counts["all"] <= 3  # the requests in flight when the first refusal came
    assert SECRET not in result.stderr + result.stdout
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
