"""The recover stage: LoRA adapters trained on each quantized variant's Silver Bullet items, re-evaluated on
the held-out problems (curate's test split), beside an untargeted control (see ``stage``). ``data``: the
training and evaluation sets; ``adapters``: keys, places and the training worker; ``evaluate``: before/after
statistics."""

from qreason.stages.recover.adapters import dense_dir, merged_dir
from qreason.stages.recover.evaluate import compare, head_to_head
from qreason.stages.recover.stage import RecoverStage, recover

__all__ = ["RecoverStage", "compare", "dense_dir", "head_to_head", "merged_dir", "recover"]
