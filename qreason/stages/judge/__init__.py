"""Failure analysis: for each failed solution, the first faulty step, its error type and the capability it
points at, by a stack of layers (``stack``): rule checks and the reference locator (no model), process reward
models, LLM judges behind OpenAI-compatible endpoints (a panel when two or more), and a prior guess.

Stage API (used by the runner and by ``qreason judge``):

    cfg = JudgeConfig(judges=[JudgeSpec(name="a", base_url="http://127.0.0.1:8000/v1", model="m")])
    stats = run_judging(RunStore(run_dir), cfg)      # appends Judgment records; resumable; returns
    JudgeSummary distribution(store)                              # per variant: error types, capabilities,
    positions

Judgments per failure: judge "rules" (arithmetic check, repetition collapse, no-answer/truncation outcome),
"reference" (the reference locator, for problems with a worked solution), one per PRM or LLM judge (named by
its spec), "panel" (two or more LLM judges: majority vote, see ``panel``) and "stack": the combined verdict,
naming the layer that decided (``stack.combine``) and any abandoned answer. The final verdict of a failure is
the stack's (``final_judgments``). The taxonomy and the prompts are data in judge_prompts/. ``run_bench``
scores the stack and each layer on ProcessBench data.
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
from qreason.stages.judge.reference import Reference, abandoned_answer, reference_verdict
from qreason.stages.judge.rules import check_arithmetic, repetition_start, rule_verdict
from qreason.stages.judge.stack import LayerVerdict, combine
from qreason.stages.judge.stage import (
    Failure,
    JudgeStage,
    JudgeSummary,
    current_judgments,
    distribution,
    final_judgments,
    is_located,
    offline_check,
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
    "LayerVerdict",
    "Reference",
    "Verdict",
    "abandoned_answer",
    "build_messages",
    "check_arithmetic",
    "combine",
    "current_judgments",
    "distribution",
    "final_judgments",
    "is_located",
    "load_judge_config",
    "offline_check",
    "load_processbench",
    "load_taxonomy",
    "load_template",
    "parse_judge_spec",
    "parse_reply",
    "processbench_metrics",
    "reference_verdict",
    "repetition_start",
    "rule_check",
    "rule_verdict",
    "run_bench",
    "run_judging",
    "select_candidates",
    "vote",
]
