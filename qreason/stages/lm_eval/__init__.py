"""The lm-eval stage: lm-evaluation-harness tasks for every variant, each served by a vLLM server of its own
(``stage``), and qreason's own tasks exported as lm-eval tasks (``export``)."""

from qreason.stages.lm_eval.stage import LmEvalStage, LmEvalTarget, check_config, run_lm_eval, targets_for

__all__ = ["LmEvalStage", "LmEvalTarget", "check_config", "run_lm_eval", "targets_for"]
