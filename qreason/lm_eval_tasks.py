"""Compatibility shim: task files exported by earlier qreason versions import ``qreason.lm_eval_tasks``; the
code lives in ``qreason.stages.lm_eval.export``."""

from qreason.stages.lm_eval.export import *  # noqa: F401,F403
