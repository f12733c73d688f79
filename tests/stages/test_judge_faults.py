"""Fault injection: a fake OpenAI-compatible judge on 127.0.0.1 that answers 429 with Retry-After, 500, slowly
(client timeout), by dropping the connection, with malformed JSON, off-schema JSON or a non-JSON body. The run
must never crash; failures are retried a bounded number of times, then recorded as judge_error; nothing is
lost."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from fault_server import JsonServer, chat_completion
from judge_helpers import GOOD, make_run

from qreason.stages.judge import JudgeConfig, JudgeInput, run_judging
from qreason.stages.judge.client import JudgeClient, ReplyCache
from qreason.stages.judge.prompts import load_taxonomy, load_template

SECRET = "sk-test-do-not-log-1234567890"

# marker -> what the server does on the 1st, 2nd, ... request carrying it (the last entry repeats)
SCRIPTS = {
    "ok": ["ok"],
    "ratelimit": ["429", "ok"],
    "flaky": ["500", "500", "ok"],
    "down": ["500"],
    "slow": ["slow"],
    "drop": ["drop", "ok"],
    "malformed": ["malformed"],
    "offschema": ["offschema", "ok"],
    "offschema_always": ["offschema"],
    "garbage": ["garbage"],
}


class FakeJudge(JsonServer):
    """A threaded HTTP server; counts requests per marker, records their times and the bearer tokens."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.auth: set[str] = set()
        self.times: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        marker = re.search(r"FAULT:(\w+)", body["messages"][-1]["content"]).group(1)
        with self.lock:
            self.auth.add(h.headers.get("Authorization", ""))
            n = self.counts[marker]
            self.counts[marker] += 1
            self.times.setdefault(marker, []).append(time.monotonic())
        assert n < 20, "unbounded retries"
        script = SCRIPTS[marker]
        action = script[min(n, len(script) - 1)] if body["model"] != "bad-judge" else "offschema"
        status, headers, ctype = 200, {}, "application/json"
        if action == "429":
            status, headers, payload = 429, {"Retry-After": "1"}, {"error": {"message": "rate limited"}}
        elif action == "500":
            status, payload = 500, {"error": {"message": "boom"}}
        elif action == "drop":
            self.drop(h)
            return
        elif action == "garbage":
            ctype, payload = "text/html", "<html>not json</html>"
        else:
            if action == "slow":
                time.sleep(3)
            content = {
                "malformed": '{"rationale": "unterminated',
                "offschema": json.dumps({**GOOD, "first_error_step": 9}),
            }.get(action, json.dumps(GOOD))
            payload = chat_completion(body, content, prompt_tokens=100, completion_tokens=10)
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send(h, status, data, ctype, headers)


@pytest.fixture
def fake():
    with FakeJudge() as server:
        yield server, server.base_url


def spec(url: str, **kw) -> dict:
    return {
        "name": "fake",
        "base_url": url,
        "model": "fake-judge",
        "api_key_env": "QREASON_TEST_JUDGE_KEY",
        "concurrency": 8,
        "timeout_s": 2.0,
        "max_retries": 2,
        "invalid_retries": 2,
        "backoff_s": 0.05,
        **kw,
    }


def fault_cases(markers):
    return [
        (
            f"f{i}",
            f"FAULT:{m} Ana has 5 apples and buys 3 more. How many?",
            "8",
            {
                "q4": (
                    "Step 1: Ana has 5 apples.\nStep 2: She buys 3 more, so she has 9.\nThe answer is "
                    "\\boxed{9}.",
                    "wrong",
                )
            },
        )
        for i, m in enumerate(markers)
    ]


def test_faults_are_retried_then_recorded(fake, tmp_path, monkeypatch, caplog):
    server, url = fake
    monkeypatch.setenv("QREASON_TEST_JUDGE_KEY", SECRET)
    caplog.set_level("DEBUG")
    markers = list(SCRIPTS)
    store = make_run(tmp_path / "run", fault_cases(markers))
    cfg = JudgeConfig.model_validate({"judges": [spec(url)]})
    t0 = time.monotonic()
    stats = run_judging(store, cfg)
    elapsed = time.monotonic() - t0
    assert elapsed < 30

    # bounded: transport failures 1 + max_retries requests; invalid replies 1 + invalid_retries attempts
    assert server.counts == Counter(
        {
            "ok": 1,
            "ratelimit": 2,
            "flaky": 3,
            "down": 3,
            "slow": 3,
            "drop": 2,
            "malformed": 3,
            "offschema": 2,
            "offschema_always": 3,
            "garbage": 3,
        }
    )
    assert stats.requests == sum(server.counts.values())
    # Retry-After: 1 was honoured
    t = server.times["ratelimit"]
    assert t[1] - t[0] >= 0.9

    by_pid = {j.problem_id: j for j in store.judgments.all() if j.judge == "fake"}
    status = {m: by_pid[f"f{i}"].status for i, m in enumerate(markers)}
    assert status == {
        "ok": "ok",
        "ratelimit": "ok",
        "flaky": "ok",
        "down": "judge_error",
        "slow": "judge_error",
        "drop": "ok",
        "malformed": "judge_error",
        "offschema": "ok",
        "offschema_always": "judge_error",
        "garbage": "judge_error",
    }
    errors = {m: by_pid[f"f{i}"].error for i, m in enumerate(markers) if status[m] != "ok"}
    assert "InternalServerError 500" in errors["down"]
    assert "Timeout" in errors["slow"]
    assert "malformed JSON" in errors["malformed"]
    assert "first_error_step 9" in errors["offschema_always"]
    assert "unreadable response" in errors["garbage"]
    ok = by_pid["f0"]
    assert (ok.first_error_step, ok.error_type, ok.sub_type) == (1, "Execution", "computational_error")
    assert ok.usage["prompt_tokens"] == 100 and ok.usage["attempts"] == 1
    assert by_pid[f"f{markers.index('offschema')}"].usage["attempts"] == 2
    # nothing lost: every failure has a rules verdict and a judge verdict
    assert len([j for j in store.judgments.all() if j.judge == "rules"]) == len(markers)
    assert stats.judges["fake"]["ok"] + stats.judges["fake"]["judge_error"] == len(markers)

    # the key was sent, and appears in no record, cache or log
    assert server.auth == {f"Bearer {SECRET}"}
    for path in (store.judgments.path, tmp_path / "run" / "judge_cache.sqlite"):
        assert SECRET.encode() not in path.read_bytes()
    assert SECRET not in caplog.text
    assert SECRET not in stats.model_dump_json()

    # re-run: valid verdicts and invalid replies are final; only the endpoint failures are asked again
    before = server.counts.copy()
    stats2 = run_judging(store, cfg)
    again = server.counts - before
    assert again == Counter({"down": 3, "slow": 3, "garbage": 3})
    assert stats2.requests == 9
    assert stats2.judges["fake"]["done"] == len(markers) - 3
    # the retried failures got new error records (events); the rest was not duplicated
    fake_records = [j for j in store.judgments.all() if j.judge == "fake"]
    assert len(fake_records) == len(markers) + 3
    # --retry-invalid asks the invalid ones again too
    before = server.counts.copy()
    run_judging(store, cfg.model_copy(update={"retry_invalid": True}))
    again = server.counts - before
    assert set(again) == {"down", "slow", "garbage", "malformed", "offschema_always"}


def test_judge_client_survives_every_fault_directly(fake, tmp_path):
    """The client alone: every fault ends in a verdict or a judge_error, never an exception."""
    _, url = fake
    from qreason.config.judge import JudgeSpec

    cache = ReplyCache(tmp_path / "cache.sqlite")
    client = JudgeClient(
        JudgeSpec.model_validate(spec(url, max_retries=1, invalid_retries=1)),
        load_template(),
        load_taxonomy(),
        cache,
    )

    async def go():
        try:
            reqs = [
                client.request(JudgeInput(problem=f"FAULT:{m} 1+1?", steps=["1 + 1 = 3", "So 3."]))
                for m in SCRIPTS
            ]
            return await asyncio.gather(*(client.judge(r) for r in reqs))
        finally:
            await client.aclose()

    verdicts = asyncio.run(go())
    assert len(verdicts) == len(SCRIPTS)
    assert all(v.status in ("ok", "judge_error") for v in verdicts)
    assert all(v.error for v in verdicts if not v.ok)
    # successful replies were cached; the failures were not
    assert len(cache) == sum(v.ok for v in verdicts)
    cache.close()


def test_batch_read_records_errors_once(tmp_path):
    """Batch output lines with an error or an invalid reply become judge_error records; re-reading adds
    nothing."""
    store = make_run(tmp_path / "run", fault_cases(["ok", "ok2", "ok3"]))
    base = {"judges": [{"name": "j", "base_url": "http://127.0.0.1:9/v1", "model": "m"}]}
    stats = run_judging(store, JudgeConfig.model_validate({**base, "batch": {"mode": "write"}}))
    path = Path(stats.batch_files[0])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 3 and all(set(x) == {"custom_id", "method", "url", "body"} for x in lines)
    assert all(x["body"]["response_format"]["type"] == "json_schema" for x in lines)
    outputs = []
    for i, line in enumerate(lines):
        if i == 0:
            resp = {
                "status_code": 200,
                "request_id": "r0",
                "body": {
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": json.dumps(GOOD)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
                },
            }
        elif i == 1:
            resp = {
                "status_code": 200,
                "request_id": "r1",
                "body": {
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "{not json"},
                            "finish_reason": "stop",
                        }
                    ]
                },
            }
        else:
            resp = {"status_code": 500, "request_id": "r2", "body": {"error": {"message": "server exploded"}}}
        outputs.append({"id": f"b{i}", "custom_id": line["custom_id"], "response": resp, "error": None})
    (path.parent / "j.batch_output.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outputs))
    read = JudgeConfig.model_validate({**base, "batch": {"mode": "read"}})
    stats = run_judging(store, read)
    assert stats.requests == 0
    assert stats.judges["j"]["ok"] == 1 and stats.judges["j"]["judge_error"] == 2
    errors = sorted(j.error for j in store.judgments.all() if j.judge == "j" and j.status == "judge_error")
    assert "malformed JSON" in errors[0] and "server exploded" in errors[1]
    n = len(store.judgments)
    run_judging(store, read)
    assert len(store.judgments) == n


def test_panel_with_a_failing_member_is_stable(fake, tmp_path):
    """A panel of a good and an always-invalid judge: the good one decides; a re-run sends and adds
    nothing."""
    server, url = fake
    store = make_run(tmp_path / "run", fault_cases(["ok", "ok"]))
    cfg = JudgeConfig.model_validate(
        {"judges": [spec(url, name="good"), spec(url, name="bad", model="bad-judge", invalid_retries=1)]}
    )
    stats = run_judging(store, cfg)
    assert (
        stats.judges["good"]["ok"] == 2
        and stats.judges["bad"]["judge_error"] == 2
        and stats.panel_written == 2
    )
    panels = [j for j in store.judgments.all() if j.judge == "panel"]
    assert all(p.status == "ok" and p.first_error_step == 1 and p.votes["n_valid"] == 1 for p in panels)
    assert all(p.votes["members"]["bad"]["status"] == "judge_error" for p in panels)
    n, sent = len(store.judgments), sum(server.counts.values())
    stats2 = run_judging(store, cfg)
    assert stats2.requests == 0 and stats2.panel_written == 0
    assert len(store.judgments) == n and sum(server.counts.values()) == sent
