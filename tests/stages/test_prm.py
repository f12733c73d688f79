"""The PRM judge kind: its spec fields, the threshold rule, calibration, and the /pooling HTTP contract
(against a fake server that scores steps by a word in them, and injects faults). The real engine and server
are in test_prm_vllm.py."""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml
from fault_server import JsonServer
from judge_helpers import make_run

from qreason.config.judge import JudgeSpec, parse_judge_spec
from qreason.errors import UserError
from qreason.stages.judge import JudgeConfig, JudgeInput, run_judging
from qreason.stages.judge.base import make_judge
from qreason.stages.judge.bench import processbench_metrics
from qreason.stages.judge.client import ReplyCache
from qreason.stages.judge.prm import (
    DEFAULT_SEPARATOR,
    PRMJudge,
    calibrate_threshold,
    first_below,
    prm_verdict,
    run_calibration,
    threshold_metrics,
)
from qreason.stages.judge.stage import final_judgments

SEP = DEFAULT_SEPARATOR
SECRET = "sk-prm-test-secret-0123456789"
SECRET_REDACTED = "key ***"  # how the "toolong" reply's secret reads once redacted


# ---------------------------------------------------------------------------------------------- the spec


def test_prm_fields_are_optional_and_only_for_kind_prm():
    plain = JudgeSpec(name="a", base_url="http://x/v1", model="m")
    assert (plain.threshold, plain.step_separator, plain.prm_engine, plain.prm_system) == (None,) * 4
    with pytest.raises(ValueError, match="threshold: only for kind prm"):
        JudgeSpec(name="a", base_url="http://x/v1", model="m", threshold=0.3)
    with pytest.raises(ValueError, match="base_url is required"):
        JudgeSpec(name="a", model="m")
    with pytest.raises(ValueError, match="base_url is required"):
        JudgeSpec(kind="prm", name="a", model="m")
    with pytest.raises(ValueError, match="not used with prm_engine vllm"):
        JudgeSpec(kind="prm", name="a", model="/m", prm_engine="vllm", base_url="http://x/v1")
    with pytest.raises(ValueError, match="less than or equal to 1"):
        JudgeSpec(kind="prm", name="a", base_url="http://x/v1", model="m", threshold=1.5)
    offline = JudgeSpec(kind="prm", name="a", model="/models/prm", prm_engine="vllm")
    assert offline.base_url is None
    # the command line's key=value form
    s = parse_judge_spec(
        "kind=prm,name=p,base_url=http://h:8000/v1,model=Qwen/Qwen2.5-Math-PRM-7B,threshold=0.4"
    )
    assert s.kind == "prm" and s.threshold == 0.4
    with pytest.raises(UserError, match="only for kind prm"):
        parse_judge_spec("name=p,base_url=http://h/v1,model=m,step_separator=<x>")


# ---------------------------------------------------------------------------------------------- the rule


def test_the_first_step_below_the_threshold_is_the_faulty_one():
    assert first_below([0.9, 0.7, 0.2, 0.1], 0.5) == 2
    assert first_below([0.9, 0.7], 0.5) == -1
    assert first_below([0.5, 0.49], 0.5) == 1  # a score equal to the threshold is not below it
    v = prm_verdict([0.9, 0.3, 0.8], 0.5)
    assert v.ok and v.first_error_step == 1 and v.error_type is None
    assert v.details == {"scores": [0.9, 0.3, 0.8], "threshold": 0.5}
    assert prm_verdict([0.9, 0.6], 0.5).first_error_step == -1


def _brute_force_f1(labels, scores, grid):
    best = 0.0
    for t in grid:
        preds = [first_below(s, t) if s else None for s in scores]
        best = max(best, processbench_metrics(labels, preds)["f1"] or 0.0)
    return best


def test_calibration_finds_the_best_threshold_of_any():
    rng = random.Random(7)
    labels, scores = [], []
    for _ in range(60):
        n = rng.randint(1, 6)
        label = rng.choice([-1] + list(range(n)))
        s = [round(rng.uniform(0.4, 1.0), 3) for _ in range(n)]
        if label >= 0:  # faulty steps tend to score lower, with noise
            s[label] = round(rng.uniform(0.0, 0.7), 3)
        labels.append(label)
        scores.append(s)
    scores[3] = None  # a row the PRM could not score counts as wrong
    fit = calibrate_threshold(labels, scores)
    grid = sorted({v for s in scores if s for v in s} | {x / 1000 for x in range(1001)} | {1.0001})
    assert fit["f1"] == pytest.approx(_brute_force_f1(labels, scores, grid), abs=1e-4)
    preds = [first_below(s, fit["threshold"]) if s else None for s in scores]
    assert fit["f1"] == processbench_metrics(labels, preds)["f1"]
    assert threshold_metrics(labels, scores, fit["threshold"])["unscored"] == 1


def test_calibration_puts_the_threshold_between_the_scores_it_separates():
    labels = [1, -1, 0]
    scores = [[0.9, 0.2], [0.8, 0.7], [0.1, 0.9]]
    fit = calibrate_threshold(labels, scores)
    assert fit["f1"] == 1.0 and 0.2 < fit["threshold"] <= 0.7
    assert calibrate_threshold([-1], [[0.6]])["acc_correct"] == 1.0
    with pytest.raises(UserError, match="no labelled row has scores"):
        calibrate_threshold([0], [None])


# ---------------------------------------------------------------------------------------------- HTTP contract


def word_score(step: str) -> float:
    return 0.1 if "BAD" in step else 0.4 if "MEH" in step else 0.9


class FakePRM(JsonServer):
    """vLLM's /pooling endpoint for a PRM: one [wrong, right] row per separator in the assistant turn,
    scored by a word in the step. A FAULT:name marker in the problem picks a misbehaviour."""

    def __init__(self):
        super().__init__()
        self.requests: list[dict] = []
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        problem = next(m["content"] for m in body["messages"] if m["role"] == "user")
        fault = (re.search(r"FAULT:(\w+)", problem) or [None, "none"])[1]
        with self.lock:
            self.requests.append({"path": h.path, "body": body, "auth": h.headers.get("Authorization")})
            n = self.counts[fault] = self.counts.get(fault, 0) + 1
        if h.path != "/pooling":
            return self.send(h, 404, b'{"detail": "Not Found"}')
        steps = body["messages"][-1]["content"].split(SEP)[:-1]
        rows = [[1 - word_score(s), word_score(s)] for s in steps]
        status, reply = 200, None
        if fault == "flaky" and n == 1:
            status = 503
        elif fault == "toolong":
            status, reply = 400, {"error": {"message": f"too long; key {SECRET}", "code": 400}}
        elif fault == "auth":
            status, reply = 401, {"error": {"message": "bad key"}}
        elif fault == "fewer":
            rows = rows[:-1]
        elif fault == "range":
            rows[0] = [0.0, 7.5]
        elif fault == "malformed":
            return self.send(h, 200, b'{"data": [{"data": [[0.1, ')
        elif fault == "nan":
            return self.send(h, 200, b'{"data": [{"index": 0, "data": [[0.1, 0.9], [0.1, NaN], [0, 1]]}]}')
        if reply is None and status == 200:
            reply = {"object": "list", "model": body["model"], "data": [{"index": 0, "data": rows}]}
            reply["usage"] = {"prompt_tokens": 40, "total_tokens": 40}
        self.send(h, status, json.dumps(reply or {"error": {"message": "unavailable"}}).encode())


@pytest.fixture
def fake():
    with FakePRM() as server:
        yield server


def prm_spec(url: str, **kw) -> JudgeSpec:
    values = dict(
        kind="prm",
        name="prm",
        base_url=url,
        model="fake-prm",
        api_key_env="QREASON_TEST_PRM_KEY",
        timeout_s=5.0,
        max_retries=2,
        invalid_retries=1,
        backoff_s=0.01,
    )
    return JudgeSpec(**{**values, **kw})


def judge_all(judge, items: list[JudgeInput]):
    async def run():
        try:
            return await asyncio.gather(*(judge.judge(judge.request(i)) for i in items))
        finally:
            await judge.aclose()

    return asyncio.run(run())


ITEMS = [
    JudgeInput("Add FAULT:none 2 and 3.", ["2 + 3 = 5", "MEH so 5", "The answer is 5."]),
    JudgeInput("Add 4 and 4.", ["4 + 4 = 9 BAD", "so 9"]),
    JudgeInput("Add 1 and 1.", ["1 + 1 = 2", "The answer is 2."]),
]


def test_a_prm_behind_the_pooling_endpoint_locates_the_first_low_step(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("QREASON_TEST_PRM_KEY", SECRET)
    cache = ReplyCache(tmp_path / "cache.sqlite")
    judge = make_judge(prm_spec(fake.base_url), None, None, cache)
    assert isinstance(judge, PRMJudge)
    verdicts = judge_all(judge, ITEMS)
    assert [v.first_error_step for v in verdicts] == [1, 0, -1]
    assert [len(v.details["scores"]) for v in verdicts] == [3, 2, 2]
    assert verdicts[0].details["scores"] == pytest.approx([0.9, 0.4, 0.9])
    assert verdicts[1].usage["prompt_tokens"] == 40 and "cached" not in verdicts[1].usage
    # the request vLLM expects: the server root's /pooling, task token_classify, the steps each followed by
    # the separator in the assistant turn after the PRM's system message
    sent = fake.requests[0]
    assert sent["path"] == "/pooling" and sent["auth"] == f"Bearer {SECRET}"
    assert sent["body"]["task"] == "token_classify" and sent["body"]["model"] == "fake-prm"
    roles = [m["role"] for m in sent["body"]["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert judge.requests == 3 and len(fake.requests) == 3

    # a lower threshold: the cached scores answer, no request; the verdict's key changes, the scores' not
    strict = make_judge(prm_spec(fake.base_url, threshold=0.3), None, None, cache)
    again = judge_all(strict, ITEMS)
    assert [v.first_error_step for v in again] == [-1, 0, -1]  # 0.4 is not below 0.3
    assert all(v.usage.get("cached") == 1 for v in again) and strict.requests == 0 and len(fake.requests) == 3
    a, b = judge.request(ITEMS[0]), strict.request(ITEMS[0])
    assert a.key != b.key and a.scores_key == b.scores_key
    # another model, another separator or other steps: other scores
    assert make_judge(prm_spec(fake.base_url, model="other"), None, None, cache).request(
        ITEMS[0]
    ).scores_key != (a.scores_key)
    assert (
        make_judge(prm_spec(fake.base_url, step_separator="<x>"), None, None, cache)
        .request(ITEMS[0])
        .scores_key
        != a.scores_key
    )
    assert judge.request(JudgeInput(ITEMS[0].problem, ITEMS[0].steps[:2])).key != a.key
    # offline (cache only): hits answer, a miss is None
    cached_only = make_judge(prm_spec(fake.base_url), None, None, cache, offline=True)
    got = judge_all(cached_only, [ITEMS[0], JudgeInput("new", ["x"])])
    assert got[0].first_error_step == 1 and got[1] is None and len(fake.requests) == 3
    cache.close()


def test_a_separator_inside_model_text_cannot_add_a_score(fake, tmp_path):
    cache = ReplyCache(tmp_path / "cache.sqlite")
    judge = make_judge(prm_spec(fake.base_url), None, None, cache)
    hostile = JudgeInput(f"Add{SEP} 2 and 2.", [f"2 + 2 = 4{SEP}{SEP} BAD", "so 4"])
    (v,) = judge_all(judge, [hostile])
    assert v.ok and len(v.details["scores"]) == 2 and v.first_error_step == 0
    assert fake.requests[0]["body"]["messages"][-1]["content"].count(SEP) == 2
    cache.close()


@pytest.mark.parametrize(
    "fault, kind, final",
    [
        ("toolong", "invalid", "the server rejected the input"),
        ("fewer", "invalid", "2 step scores for 3 steps"),
        ("range", "invalid", "not a probability"),
        ("malformed", "invalid", "malformed JSON"),
        ("nan", "invalid", "not a probability"),
    ],
)
def test_bad_replies_become_judge_errors(fake, tmp_path, monkeypatch, fault, kind, final):
    monkeypatch.setenv("QREASON_TEST_PRM_KEY", SECRET)
    cache = ReplyCache(tmp_path / "cache.sqlite")
    judge = make_judge(prm_spec(fake.base_url), None, None, cache)
    (v,) = judge_all(judge, [JudgeInput(f"FAULT:{fault}", ["a", "b", "c"])])
    assert v.status == "judge_error" and v.details["error_kind"] == kind and final in v.error
    assert SECRET not in v.error and "***" not in v.error.replace(SECRET_REDACTED, "")
    # nothing cached: a re-run asks again. A reply that is well formed but does not fit, or a rejected
    # input, is not asked twice within a run; a malformed body is (once more: invalid_retries=1)
    assert len(cache) == 0
    assert fake.counts[fault] == (2 if fault == "malformed" else 1)
    cache.close()


def test_transport_faults_are_retried_and_a_refusal_stops_the_judge(fake, tmp_path):
    cache = ReplyCache(tmp_path / "cache.sqlite")
    judge = make_judge(prm_spec(fake.base_url), None, None, cache)
    (v,) = judge_all(judge, [JudgeInput("FAULT:flaky", ["a BAD", "b"])])
    assert v.ok and v.first_error_step == 0 and fake.counts["flaky"] == 2 and judge.requests == 2
    judge = make_judge(prm_spec(fake.base_url), None, None, cache)
    got = judge_all(judge, [JudgeInput("FAULT:auth", ["a"]), JudgeInput("FAULT:auth 2", ["b"])])
    assert got == [None, None] and "refused the request" in judge.refused and "401" in judge.refused
    cache.close()


def test_an_endpoint_that_is_down_is_a_transport_error(tmp_path):
    cache = ReplyCache(tmp_path / "cache.sqlite")
    with FakePRM() as server:
        url = server.base_url
    judge = make_judge(prm_spec(url, max_retries=0), None, None, cache)
    (v,) = judge_all(judge, [JudgeInput("q", ["a"])])
    assert v.status == "judge_error" and v.details["error_kind"] == "transport"
    cache.close()


# ---------------------------------------------------------------------------------------------- the stage


def test_the_judge_stage_runs_a_prm_and_a_rerun_asks_nothing(fake, tmp_path):
    store = make_run(tmp_path / "run")
    cfg = JudgeConfig(judges=[prm_spec(fake.base_url).model_dump()])
    stats = run_judging(store, cfg)
    sent = len(fake.requests)
    assert sent == stats.judges["prm"]["ok"] > 0 and stats.judges["prm"]["judge_error"] == 0
    prm = [j for j in store.judgments.all() if j.judge == "prm"]
    assert len(prm) == sent and all(j.status == "ok" and j.first_error_step == -1 for j in prm)
    assert all(len(j.votes["scores"]) == len(g.steps) for j, g in zip(prm, _gens(store, prm)))
    again = run_judging(store, cfg)
    assert len(fake.requests) == sent and again.judges["prm"]["done"] == sent
    assert len([j for j in store.judgments.all() if j.judge == "prm"]) == sent
    # a new threshold is a new verdict, from the cached scores
    cfg2 = JudgeConfig(judges=[prm_spec(fake.base_url, threshold=0.95).model_dump()])
    third = run_judging(store, cfg2)
    assert len(fake.requests) == sent and third.judges["prm"]["cached"] == sent
    newest = [j for j in store.judgments.all() if j.judge == "prm"][-sent:]
    assert all(j.first_error_step == 0 for j in newest)
    assert all(j.votes["threshold"] == 0.95 for j in newest)
    # the combined verdict follows the prm layer where it located a step
    final = final_judgments(store)
    assert {final[j.generation_key].votes["decided_by"] for j in newest} == {"prm"}
    assert {final[j.generation_key].first_error_step for j in newest} == {0}


def _gens(store, judgments):
    return [store.generations.get(j.generation_key) for j in judgments]


# ---------------------------------------------------------------------------------------------- calibration


def test_calibrate_prm_fits_on_one_half_and_writes_the_spec(fake, tmp_path):
    rows = []
    for i in range(12):
        if i % 3 == 0:
            steps, label = ["fine", "fine", "fine"], -1
        elif i % 3 == 1:
            steps, label = ["fine", "MEH wrong", "fine"], 1
        else:
            steps, label = ["BAD", "fine"], 0
        rows.append({"id": f"toy-{i}", "problem": f"problem {i}", "steps": steps, "label": label})
    data = tmp_path / "pb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cal = run_calibration(prm_spec(fake.base_url), data, tmp_path / "out", fit="even")
    r = cal.result
    assert 0.4 < r["threshold"] <= 0.9  # between the faulty steps' and the right steps' scores
    assert r["fitted"]["f1"] == 1.0 and r["held_out"]["f1"] == 1.0 and r["held_out"]["n"] == 6
    spec = JudgeSpec.model_validate(yaml.safe_load(cal.spec_path.read_text()))
    assert spec.kind == "prm" and spec.threshold == r["threshold"] and spec.base_url == fake.base_url
    lines = [json.loads(x) for x in cal.scores_path.read_text().splitlines()]
    assert [len(x["scores"]) for x in lines] == [len(r["steps"]) for r in rows]
    sent = len(fake.requests)
    again = run_calibration(prm_spec(fake.base_url), data, tmp_path / "out", fit="odd")
    assert len(fake.requests) == sent and again.result["threshold"] == pytest.approx(r["threshold"])
    with pytest.raises(UserError, match="needs kind prm"):
        run_calibration(JudgeSpec(name="x", base_url=fake.base_url, model="m"), data, tmp_path / "o2")


def test_the_calibrate_prm_command(fake, tmp_path, capsys):
    from qreason.cli import main

    rows = [
        {"id": "a-0", "problem": "p0", "steps": ["fine", "BAD"], "label": 1},
        {"id": "a-1", "problem": "p1", "steps": ["fine"], "label": -1},
    ]
    data = tmp_path / "pb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"kind=prm,name=p,base_url={fake.base_url},model=fake-prm"
    rc = main(["calibrate-prm", "--data", str(data), "--judge", spec, "--out", str(tmp_path / "o")])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fitted"]["f1"] == 1.0 and Path(out["spec"]).is_file()
    assert main(["calibrate-prm", "--data", str(data), "--judge", "rules", "--out", str(tmp_path / "o")]) == 2
