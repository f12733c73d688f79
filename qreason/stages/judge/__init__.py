"""Failure analysis: for each failed solution, the first faulty step, its error type and the capability it
points at, by rule checks (always, no LLM) and by a panel of LLM judges behind OpenAI-compatible endpoints.

Stage API (used by the runner and by ``qreason judge``):

    cfg = JudgeConfig(judges=[JudgeSpec(name="a", base_url="http://127.0.0.1:8000/v1", model="m")])
    stats = run_judging(RunStore(run_dir), cfg)      # appends Judgment records; resumable; returns
    JudgeSummary distribution(store)                              # per variant: error types, capabilities,
    positions

Judgments per failure: judge "rules" (arithmetic check, repetition collapse, no-answer/truncation outcome),
one per LLM judge (named by its spec), and "panel" (two or more judges: majority vote, see ``panel``). The
final verdict of a failure is the panel's, else the single judge's, else the rules' (``final_judgments``). The
taxonomy and the prompts are data in judge_prompts/. ``run_bench`` scores any of these judges on ProcessBench
data.
"""

from qreason.config.judge import BatchConfig, JudgeConfig, JudgeSpec, load_judge_config, parse_judge_spec
from qreason.stages.judge.bench import load_processbench, processbench_metrics, run_bench
from qreason.stages.judge.panel import vote
from qreason.stages.judge.prompts import (
    JudgeInput,
    Verdict,
    build_messages,
    load_taxonomy,
    load_template,
    parse_reply,
)
from qreason.stages.judge.rules import check_arithmetic, repetition_start, rule_verdict
from qreason.stages.judge.stage import (
    Failure,
    JudgeStage,
    JudgeSummary,
    current_judgments,
    distribution,
    final_judgments,
    rule_check,
    run_judging,
    select_candidates,
)

__all__ = [
    "BatchConfig",
    "JudgeConfig",
    "JudgeInput",
    "JudgeSpec",
    "Failure",
    "JudgeStage",
    "JudgeSummary",
    "Verdict",
    "build_messages",
    "check_arithmetic",
    "current_judgments",
    "distribution",
    "final_judgments",
    "load_judge_config",
    "load_processbench",
    "load_taxonomy",
    "load_template",
    "parse_judge_spec",
    "parse_reply",
    "processbench_metrics",
    "repetition_start",
    "rule_check",
    "rule_verdict",
    "run_bench",
    "run_judging",
    "select_candidates",
    "vote",
]
