"""The judge stage: read generations, grades and problems from the run store; append Judgment records.

For every selected failure, the rule checks run first (judge "rules"); then each LLM judge of the config
(judge = its name); then, with two or more judges, the panel's vote (judge "panel"). Records are appended per
failure as soon as its verdicts are in, so an interrupted run loses only what was in flight, and the reply
cache keeps even that. Keys:
- rules:  content_key("judgment", generation, "rules", rules revision, grade status)
- judge:  content_key("judgment", generation, judge name, request key) where the request key covers the judge
          model, the prompt version and the whole request; a valid verdict under this key is never redone
- errors: "no valid reply after all attempts" is stored under a key derived from the judge key and, like a
          verdict, not redone (unless ``retry_invalid``); a transport failure (endpoint down, timeouts, 5xx
          after the client's retries) gets a fresh key, so the next run tries again. The newest record of a
          (generation, judge) pair is its current one (``current_judgments``)
- panel:  content_key("judgment", generation, "panel", the member records' keys)
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qreason import console
from qreason.config.judge import PANEL_JUDGE, RULES_JUDGE, JudgeConfig
from qreason.config.schema import RunConfig
from qreason.engines.openai_http import redact
from qreason.errors import UserError
from qreason.flips import is_flip, latest_grades, solved_cells
from qreason.records import Generation, Grade, Judgment, Problem, content_key
from qreason.stages.base import RunContext
from qreason.stages.judge.base import make_judge
from qreason.stages.judge.client import (
    JudgeClient,
    JudgeRequest,
    ReplyCache,
    add_usage,
    read_batch,
    write_batch,
)
from qreason.stages.judge.measured import prior_step_for
from qreason.stages.judge.panel import vote
from qreason.stages.judge.prompts import OUTCOME, JudgeInput, Verdict, load_taxonomy, load_template
from qreason.stages.judge.reference import (
    REFERENCE_REVISION,
    Reference,
    abandoned_answer,
    arithmetic_reference,
    reference_verdict,
)
from qreason.stages.judge.rules import RULES_REVISION, Unchecked, rule_verdict_call, screen
from qreason.stages.judge.stack import (
    LLM,
    PRIOR,
    PRM,
    REFERENCE,
    RULES,
    STACK_JUDGE,
    LayerVerdict,
    combine,
)
from qreason.store import RunStore, Table, now_iso
from qreason.summary import JudgeSummary

log = logging.getLogger(__name__)


@dataclass
class Failure:
    """A failed solution to judge: its generation, grade and problem, and whether it is a flip."""

    generation: Generation
    grade: Grade
    problem: Problem
    flip: bool


# ---------------------------------------------------------------------------------------------- selection


def select_candidates(store: RunStore, cfg: JudgeConfig) -> list[Failure]:
    """The failures to judge: graded with a status in cfg.statuses, flips marked; only flips if cfg.which
    says so."""
    grades = latest_grades(store.grades.all())
    solved = solved_cells(grades.values(), cfg.base_variant)
    problems = {(p.task, p.problem_id): p for p in store.problems.all()}
    out = []
    for grade in grades.values():
        if grade.status not in cfg.statuses:
            continue
        gen = store.generations.get(grade.generation_key)
        if gen is None:
            raise UserError(
                str(store.grades.path), f"grade {grade.key} refers to a generation that is not stored"
            )
        problem = problems.get((gen.task, gen.problem_id))
        if problem is None:
            raise UserError(
                str(store.problems.path), f"no problem {gen.task}/{gen.problem_id} for generation {gen.key}"
            )
        flip = is_flip(gen, cfg.base_variant, solved)
        if cfg.which == "flips" and not flip:
            continue
        out.append(Failure(gen, grade, problem, flip))
    return out


def reference_solution(problem: Problem) -> str | None:
    """The problem's worked reference solution (task field ``reference_solution``, or the reference steps,
    e.g. the synthetic task's ``a + b = c`` values), or None."""
    meta = problem.meta or {}
    ref = meta.get("reference_solution")
    if not ref and isinstance(meta.get("reference_steps"), list):
        ref = "\n".join(str(s) for s in meta["reference_steps"])
    return str(ref) if ref else None


def judge_input(c: Failure) -> JudgeInput:
    return JudgeInput(
        problem=c.problem.question,
        steps=list(c.generation.steps),
        reference_answer=c.problem.answer,
        reference_solution=reference_solution(c.problem),
    )


# ---------------------------------------------------------------------------------------------- records


def rules_key(c: Failure) -> str:
    return content_key("judgment", c.generation.key, RULES_JUDGE, RULES_REVISION, c.grade.status)


def reference_key(c: Failure) -> str:
    return content_key(
        "judgment",
        c.generation.key,
        REFERENCE,
        REFERENCE_REVISION,
        c.grade.status,
        c.problem.answer,
        reference_solution(c.problem),
    )


def judge_key(c: Failure, name: str, req: JudgeRequest) -> str:
    return content_key("judgment", c.generation.key, name, req.key)


def invalid_key(key: str) -> str:
    """Where a judge's final "no valid reply" for a request is stored; like a verdict, it is not redone."""
    return content_key(key, "invalid_reply")


def finished(store: RunStore, key: str, retry_invalid: bool) -> Judgment | None:
    """The stored outcome of a judge request that needs no new attempt: its verdict, or its final invalid
    reply."""
    done = store.judgments.get(key)
    if done is None and not retry_invalid:
        done = store.judgments.get(invalid_key(key))
    return done


def error_key(key: str, v: Verdict) -> str:
    """The key of a judge_error record. Invalid replies: final (``invalid_key``). Transport failures: a fresh
    key, so the next run tries again; from a batch output file: derived from the error, so re-reading the file
    adds nothing."""
    if v.details.get("error_kind") == "invalid":
        return invalid_key(key)
    if v.details.get("batch"):
        return content_key(key, "judge_error", "batch", v.error)
    return content_key(key, "judge_error", secrets.token_hex(8))


def to_record(
    c: Failure,
    key: str,
    judge: str,
    v: Verdict,
    prompt_version: str | None,
    votes: dict[str, Any] | None = None,
) -> Judgment:
    g = c.generation
    return Judgment(
        key=key,
        generation_key=g.key,
        variant=g.variant,
        task=g.task,
        problem_id=g.problem_id,
        seed=g.seed,
        judge=judge,
        prompt_version=prompt_version,
        status=v.status,
        first_error_step=v.first_error_step,
        error_type=v.error_type,
        sub_type=v.sub_type,
        capability=v.capability,
        rationale=v.rationale,
        flip=c.flip,
        votes=votes or {},
        usage={k: int(x) for k, x in v.usage.items()},
        error=v.error,
        created_at=now_iso(),
    )


def to_verdict(j: Judgment) -> Verdict:
    return Verdict(
        status=j.status,
        first_error_step=j.first_error_step,
        error_type=j.error_type,
        sub_type=j.sub_type,
        capability=j.capability,
        rationale=j.rationale,
        error=j.error,
        usage=dict(j.usage),
    )


# ---------------------------------------------------------------------------------------------- the stage


def _resolve(store: RunStore, path: str | None, default: str) -> Path:
    p = Path(path).expanduser() if path else Path(default)
    return p if p.is_absolute() else store.dir / p


def _run_coroutine(coro):
    """asyncio.run, also from a thread that already runs an event loop (then in a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def worker():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=worker, name="qreason-judge")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


RULES_FLUSH_EVERY = 32  # rule verdicts are appended in groups this small, so a killed run keeps what was done


def rule_check(
    table: Table[Judgment], candidates: list[Failure], timeout_s: float
) -> tuple[dict[str, Judgment], int]:
    """The rule-check record of every candidate (generation key -> record) and how many were written to
    ``table`` (the run's judgments, or the recover stage's). Missing ones are computed in worker
    processes, each generation under a wall-clock limit (the checks read untrusted model output); one that
    overruns gets a rule-check error record, which, like a verdict, is final, so a re-run neither redoes nor
    hangs on it. Records are appended as they come in."""
    from qreason.pool import bounded_calls

    out: dict[str, Judgment] = {}
    jobs = []
    for c in candidates:
        rec = table.get(rules_key(c))
        if rec is None:
            jobs.append((c, (list(c.generation.steps), c.grade.status)))
        else:
            out[c.generation.key] = rec
    pending: list[Judgment] = []
    written = 0
    for c, ok, result in bounded_calls(rule_verdict_call, jobs, timeout_s, min(2, max(len(jobs), 1))):
        verdict = result if ok else Verdict(status="judge_error", error=f"rule checks {result}")
        rec = to_record(
            c, rules_key(c), RULES_JUDGE, verdict, None, {"findings": verdict.details.get("findings", [])}
        )
        out[c.generation.key] = rec
        pending.append(rec)
        if len(pending) >= RULES_FLUSH_EVERY or not ok:
            written += table.append(pending)
            pending = []
    return out, written + table.append(pending)


def offline_call(args: tuple) -> dict[str, Verdict]:
    """The model-free layers on one solution, for a worker process: {"rules": ..., "reference": ...} (the
    layers asked for). Hostile text (``rules.screen``) is a judge_error of each layer, never an exception."""
    steps, status, problem, answer, solution, layers = args
    out: dict[str, Verdict] = {}
    if RULES in layers:
        out[RULES] = rule_verdict_call((steps, status))
    if REFERENCE in layers:
        try:
            screen(steps)
            ref = Reference(problem, answer, solution)
            out[REFERENCE] = reference_verdict(steps, ref, False if status == "wrong" else None)
        except Unchecked as exc:
            out[REFERENCE] = Verdict(status="judge_error", error=f"reference locator: {exc}")
    return out


def offline_check(
    table: Table[Judgment], candidates: list[Failure], timeout_s: float, layers: list[str]
) -> tuple[dict[str, dict[str, Judgment]], int]:
    """The records of the model-free layers (rules; reference, for problems with a worked reference) of every
    candidate: generation key -> layer -> record, and how many were written. Missing ones are computed in
    worker processes under a wall-clock limit per generation (an overrun is a judge_error record of each
    missing layer, final like a verdict); records are appended as they come in."""
    from qreason.pool import bounded_calls

    out: dict[str, dict[str, Judgment]] = {}
    jobs = []
    for c in candidates:
        want = {}
        if RULES in layers:
            want[RULES] = rules_key(c)
        if REFERENCE in layers and arithmetic_reference(reference_solution(c.problem)):
            want[REFERENCE] = reference_key(c)
        mine = out.setdefault(c.generation.key, {})
        missing = []
        for layer, key in want.items():
            rec = table.get(key)
            if rec is None:
                missing.append(layer)
            else:
                mine[layer] = rec
        if missing:
            args = (
                list(c.generation.steps),
                c.grade.status,
                c.problem.question,
                c.problem.answer,
                reference_solution(c.problem),
                missing,
            )
            jobs.append(((c, want), args))
    pending: list[Judgment] = []
    written = 0
    workers = min(2, max(len(jobs), 1))
    for (c, want), ok, result in bounded_calls(offline_call, jobs, timeout_s, workers):
        if not ok:
            what = {RULES: "rule checks", REFERENCE: "reference locator"}
            result = {
                layer: Verdict(status="judge_error", error=f"{what[layer]} {result}")
                for layer in want
                if layer not in out[c.generation.key]
            }
        for layer, verdict in result.items():
            votes = {"findings": verdict.details.get("findings", [])} if layer == RULES else {}
            if layer == REFERENCE and verdict.details.get("rule"):
                votes = {"rule": verdict.details["rule"]}
            rec = to_record(c, want[layer], layer, verdict, None, votes)
            out[c.generation.key][layer] = rec
            pending.append(rec)
        if len(pending) >= RULES_FLUSH_EVERY or not ok:
            written += table.append(pending)
            pending = []
    return out, written + table.append(pending)


def abandoned(c: Failure) -> dict | None:
    """The abandoned-answer outcome of a wrong solution (``reference.abandoned_answer``) with the tokens up to
    the end of the step that states the correct value and in all, estimated in proportion to characters."""
    steps = list(c.generation.steps)
    found = abandoned_answer(steps, c.problem.answer)
    if found is None:
        return None
    chars = sum(len(s) for s in steps) or 1
    through = sum(len(s) for s in steps[: found["step"] + 1])
    tokens = c.generation.completion_tokens
    if tokens:
        found.update(tokens=tokens, tokens_to_correct=round(tokens * through / chars))
    return found


def stack_records(
    store: RunStore, candidates: list[Failure], cfg: JudgeConfig, offline: dict[str, dict[str, Judgment]]
) -> int:
    """Write the combined verdict (judge "stack") of every candidate whose layer records changed since its
    last one; returns how many were written."""
    current = current_judgments(store, cfg.prompt_version)
    prm = [j.name for j in cfg.judges if j.kind == "prm" and PRM in cfg.layers]
    llm = [j.name for j in cfg.judges if j.kind != "prm" and LLM in cfg.layers]
    use_prior = PRIOR in cfg.layers
    records = []
    for c in candidates:
        gk = c.generation.key
        by = {**current.get(gk, {}), **offline.get(gk, {})}
        members: list[tuple[str, Judgment]] = [
            (layer, by[layer]) for layer in (RULES, REFERENCE) if layer in cfg.layers and layer in by
        ]
        members += [(PRM, by[n]) for n in prm if n in by]
        if len(llm) >= 2 and PANEL_JUDGE in by:
            members.append((LLM, by[PANEL_JUDGE]))
        elif len(llm) == 1 and llm[0] in by:
            members.append((LLM, by[llm[0]]))
        if not members:
            continue
        wrong = c.grade.status == "wrong"
        prior = prior_step_for(c.generation.task, cfg.prior_step) if use_prior else None
        key = content_key("judgment", gk, STACK_JUDGE, [j.key for _, j in members], prior, wrong, 1)
        if key in store.judgments:
            continue
        verdict, layer, _ = combine(
            [LayerVerdict(lay, j.judge, to_verdict(j)) for lay, j in members],
            wrong,
            len(c.generation.steps),
            prior,
        )
        votes = dict(verdict.details)
        votes["answer_wrong"] = wrong
        votes["abandoned_answer"] = abandoned(c) if wrong else None
        version = next((j.prompt_version for _, j in members if j.prompt_version), None)
        records.append(to_record(c, key, STACK_JUDGE, verdict, version, votes))
    return store.judgments.append(records)


def run_judging(store: RunStore, cfg: JudgeConfig) -> JudgeSummary:
    """Judge the selected failures of a run; appends to store.judgments. Safe to re-run: finished work is
    skipped, cached replies are reused, endpoint failures are retried (invalid replies too with
    cfg.retry_invalid)."""
    t0 = time.monotonic()
    stats = JudgeSummary()
    candidates = select_candidates(store, cfg)
    stats.candidates = len(candidates)
    stats.flips = sum(c.flip for c in candidates)

    offline, stats.rules_written = offline_check(store.judgments, candidates, cfg.rules_timeout_s, cfg.layers)
    try:
        _run_model_layers(store, cfg, candidates, offline, stats)
    finally:
        stats.stack_written = stack_records(store, candidates, cfg, offline)
        stats.seconds = round(time.monotonic() - t0, 3)
    return stats


def _run_model_layers(
    store: RunStore,
    cfg: JudgeConfig,
    candidates: list[Failure],
    offline: dict[str, dict[str, Judgment]],
    stats: JudgeSummary,
) -> None:
    """The prm and llm layers (the judge specs of the config whose layer is listed)."""
    t0 = time.monotonic()
    if not cfg.judges:
        return

    def outcome(c: Failure) -> bool:
        rec = offline.get(c.generation.key, {}).get(RULES)
        return rec is not None and rec.error_type == OUTCOME

    todo = [c for c in candidates if c.generation.steps and (cfg.llm_for_outcomes or not outcome(c))]
    stats.llm_items = len(todo)
    template = load_template(cfg.prompt_version)
    taxonomy = load_taxonomy()
    cache = ReplyCache(_resolve(store, cfg.cache_path, "judge_cache.sqlite"))
    batch_dir = _resolve(store, cfg.batch.dir, "judge_batch")
    clients = [
        make_judge(spec, template, taxonomy, cache, offline=cfg.batch.mode != "off") for spec in cfg.judges
    ]
    for cl in clients:
        stats.judges[cl.spec.name] = {"ok": 0, "judge_error": 0, "cached": 0, "done": 0, "pending": 0}
    try:
        requests = {cl.spec.name: [cl.request(judge_input(c)) for c in todo] for cl in clients}
        if cfg.batch.mode == "write":
            for cl in clients:
                pending = [
                    r
                    for c, r in zip(todo, requests[cl.spec.name])
                    if finished(store, judge_key(c, cl.spec.name, r), cfg.retry_invalid) is None
                    and cl.cache.get(r.key) is None
                ]
                path = batch_dir / f"{cl.spec.name.replace('/', '_')}.batch_input.jsonl"
                n = write_batch(path, pending)
                stats.judges[cl.spec.name]["pending"] = n
                stats.batch_files.append(str(path))
            return
        failures: dict[str, dict[str, Verdict]] = {cl.spec.name: {} for cl in clients}
        if cfg.batch.mode == "read":
            for cl in clients:
                path = batch_dir / f"{cl.spec.name.replace('/', '_')}.batch_output.jsonl"
                if path.is_file():
                    failures[cl.spec.name] = read_batch(path, cl, {r.key: r for r in requests[cl.spec.name]})
                    stats.batch_files.append(str(path))
                else:
                    log.warning("judge %s: no batch output file %s", cl.spec.name, path)
        _run_coroutine(_judge_all(store, todo, clients, requests, failures, stats, cfg.retry_invalid))
    finally:
        stats.requests = sum(cl.requests for cl in clients)
        stats.errors = [
            cl.refused for cl in clients if getattr(cl, "refused", None)
        ]  # the caller reports them
        cache.close()
        log.debug("model layers took %.1f s", time.monotonic() - t0)


async def _judge_all(
    store: RunStore,
    todo: list[Failure],
    clients: list[JudgeClient],
    requests: dict[str, list[JudgeRequest]],
    failures: dict[str, dict[str, Verdict]],
    stats: JudgeSummary,
    retry_invalid: bool,
) -> None:
    version = clients[0].template.version
    bar = console.progress(len(todo), "judge", "sol")

    async def member(
        c: Failure, cl: JudgeClient, req: JudgeRequest
    ) -> tuple[str, Verdict | None, Judgment | None]:
        name = cl.spec.name
        key = judge_key(c, name, req)
        done = finished(store, key, retry_invalid)
        if done is not None:
            stats.judges[name]["done"] += 1
            return done.key, to_verdict(done), None
        try:
            verdict = failures[name].get(req.key) or await cl.judge(req)
        except Exception as exc:  # noqa: BLE001 - one member's bug must not stop the panel or the run
            error = redact(f"judge failed: {type(exc).__name__}: {str(exc)[:200]}", cl.secrets)
            log.warning("judge %s on %s: %s", name, c.generation.key, error)
            verdict = Verdict(status="judge_error", error=error, details={"error_kind": "transport"})
        if verdict is None:
            stats.judges[name]["pending"] += 1
            return key, None, None
        if verdict.ok:
            stats.judges[name]["ok"] += 1
            stats.judges[name]["cached"] += int(verdict.usage.get("cached", 0))
            if not verdict.usage.get("cached"):
                add_usage(stats.usage, verdict.usage)
        else:
            stats.judges[name]["judge_error"] += 1
            stats.first_errors.setdefault(name, verdict.error or verdict.status)
            add_usage(stats.usage, verdict.usage)
            key = error_key(key, verdict)
        votes: dict[str, Any] = {"model": cl.spec.model}
        if cl.spec.kind == "prm":  # keep the per-step scores: a later threshold needs no new request
            votes.update({k: verdict.details[k] for k in ("scores", "threshold") if k in verdict.details})
        return key, verdict, to_record(c, key, name, verdict, version, votes)

    async def one(i: int, c: Failure) -> None:
        results = await asyncio.gather(*(member(c, cl, requests[cl.spec.name][i]) for cl in clients))
        records = [rec for _, _, rec in results if rec is not None]
        # the panel votes over the LLM judges only; a process reward model is a layer of its own
        panel_members = [(cl, r) for cl, r in zip(clients, results) if cl.spec.kind != "prm"]
        if len(panel_members) >= 2 and all(v is not None for _, (_, v, _) in panel_members):
            key = content_key("judgment", c.generation.key, PANEL_JUDGE, [r[0] for _, r in panel_members])
            if key not in store.judgments:
                panel = vote([(cl.spec.name, v) for cl, (_, v, _) in panel_members])
                records.append(to_record(c, key, PANEL_JUDGE, panel, version, panel.details))
                stats.panel_written += 1
        store.judgments.append(records)
        bar.update()

    try:
        await asyncio.gather(*(one(i, c) for i, c in enumerate(todo)))
    finally:
        bar.close()
        for cl in clients:
            await cl.aclose()


# ---------------------------------------------------------------------------------------------- reading back


def current_judgments(store: RunStore, prompt_version: str | None = None) -> dict[str, dict[str, Judgment]]:
    """generation key -> judge -> its current record: the newest valid one, else the newest judge_error."""
    out: dict[str, dict[str, Judgment]] = {}
    for j in store.judgments.all():
        if prompt_version and j.prompt_version is not None and j.prompt_version != prompt_version:
            continue
        mine = out.setdefault(j.generation_key, {})
        old = mine.get(j.judge)
        if old is None or j.status == "ok" or old.status != "ok":
            mine[j.judge] = j
    return out


def final_judgments(store: RunStore, prompt_version: str | None = None) -> dict[str, Judgment]:
    """The verdict that counts for each judged generation: the combined verdict of the judge stack (judge
    "stack", ``stack.combine``); for runs judged before the stack existed, the panel's when valid, else a
    single LLM judge's when valid (the newest), else the rule checks'."""
    out = {}
    for gen_key, by_judge in current_judgments(store, prompt_version).items():
        if STACK_JUDGE in by_judge:
            out[gen_key] = by_judge[STACK_JUDGE]
            continue
        panel = by_judge.get(PANEL_JUDGE)
        llm = [
            j
            for name, j in by_judge.items()
            if name not in (PANEL_JUDGE, RULES_JUDGE, REFERENCE) and j.status == "ok"
        ]
        if panel is not None and panel.status == "ok":
            out[gen_key] = panel
        elif llm:
            out[gen_key] = max(llm, key=lambda j: j.created_at)
        elif RULES_JUDGE in by_judge:
            out[gen_key] = by_judge[RULES_JUDGE]
        else:
            out[gen_key] = next(iter(by_judge.values()))
    return out


def is_located(j: Judgment) -> bool:
    """Whether a verdict locates a first faulty step: a step index, not guessed by the prior layer."""
    return (
        j.status == "ok"
        and j.first_error_step is not None
        and j.first_error_step >= 0
        and j.votes.get("decided_by") != PRIOR
    )


def _positions(values: list[float], bins: list[tuple[str, float, float]] | None = None) -> dict[str, Any]:
    if not values:
        return {"n": 0, "histogram": {}, "mean": None, "median": None}
    if bins is None:
        hist = {str(int(k)): n for k, n in sorted(Counter(values).items())}
    else:
        hist = {label: sum(lo <= v < hi for v in values) for label, lo, hi in bins}
    return {
        "n": len(values),
        "histogram": hist,
        "mean": round(statistics.fmean(values), 4),
        "median": round(statistics.median(values), 4),
    }


RELATIVE_BINS = [
    ("0.0-0.2", 0.0, 0.2),
    ("0.2-0.4", 0.2, 0.4),
    ("0.4-0.6", 0.4, 0.6),
    ("0.6-0.8", 0.6, 0.8),
    ("0.8-1.0", 0.8, 1.01),
]


def distribution(
    store: RunStore, source: str = "final", flips_only: bool = False, prompt_version: str | None = None
) -> dict[str, dict[str, Any]]:
    """Per variant: counts of error types, sub-types and capabilities, where the first faulty step lies
    (absolute index, and index / number of steps), the deciding layers (``sources``), the share of failures
    with a located step (``coverage``; the prior's guesses do not count) and the abandoned answers among the
    wrong ones. ``source``: "final" (the combined verdict), or one judge's name ("rules", "reference",
    "panel", a judge). Plain dicts, ready for JSON."""
    if source == "final":
        chosen = final_judgments(store, prompt_version)
    else:
        chosen = {k: by[source] for k, by in current_judgments(store, prompt_version).items() if source in by}
    out: dict[str, dict[str, Any]] = {}
    per_variant: dict[str, list[Judgment]] = {}
    for j in chosen.values():
        if flips_only and not j.flip:
            continue
        per_variant.setdefault(j.variant, []).append(j)
    for variant, items in sorted(per_variant.items()):
        ok = [j for j in items if j.status == "ok"]
        located = [j for j in ok if is_located(j)]
        absolute, relative = [], []
        for j in located:
            absolute.append(float(j.first_error_step))
            gen = store.generations.get(j.generation_key)
            if gen is not None and gen.steps:
                relative.append(j.first_error_step / len(gen.steps))
        out[variant] = {
            "failures": len(items),
            "flips": sum(j.flip for j in items),
            "judge_errors": len(items) - len(ok),
            "sources": dict(Counter(j.votes.get("decided_by") or j.judge for j in items)),
            "coverage": round(len(located) / len(items), 4) if items else None,
            "abandoned_answers": sum(bool(j.votes.get("abandoned_answer")) for j in items),
            "wrong_answers": sum(bool(j.votes.get("answer_wrong")) for j in items),
            "error_types": dict(Counter(j.error_type for j in ok if j.error_type)),
            "sub_types": dict(Counter(j.sub_type for j in ok if j.sub_type)),
            "capabilities": dict(Counter(j.capability for j in ok if j.capability)),
            "no_faulty_step": sum(j.first_error_step == -1 for j in ok),
            "first_error_step": _positions(absolute),
            "relative_position": _positions(relative, RELATIVE_BINS),
        }
    return out


class JudgeStage:
    """Judge the run's failures: rule checks always, the LLM panel when judges are configured."""

    name = "judge"
    section = "judge"

    def enabled(self, cfg: RunConfig) -> bool:
        return True

    def run(self, ctx: RunContext) -> JudgeSummary:
        stats = run_judging(ctx.store, ctx.cfg.judge)  # the run config sets base_variant to its model's name
        failure = judging_failure(stats)
        if failure:
            ctx.summary.stage_failures[self.name] = failure
        return stats


def judging_failure(stats: JudgeSummary) -> str | None:
    """Why judging failed, where a judge (an LLM judge or a process reward model) got no valid verdict for any
    solution it was asked about in this run: every request failed. None otherwise."""
    dead = [
        (name, c) for name, c in stats.judges.items() if c["judge_error"] and not c["ok"] and not c["cached"]
    ]
    if not dead:
        return None
    return "; ".join(
        f"judge {name}: all {c['judge_error']} requests failed (first: {stats.first_errors.get(name, '?')})"
        for name, c in dead
    )
