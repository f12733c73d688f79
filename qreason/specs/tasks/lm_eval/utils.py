"""lm-eval functions of the tasks in this directory: thin shims over qreason.lm_eval_tasks."""

from qreason.stages.lm_eval import export as lm_eval_tasks


def dataset(**metadata):
    return lm_eval_tasks.synthetic_mc_dataset(**metadata)
