"""Run inside lm-eval's environment (.venv-bench) by tests/stages/test_lm_eval.py: lm-eval scores a qreason
run's own generations through the exported qreason_<task> task.

    python tests/lm_eval_replay.py GENERATIONS.jsonl EXPORT_DIR TASK TOKENIZER OUT.json

``ReplayLM`` is an lm-eval model that answers each generation request with the text qreason generated for the
same chat messages. Its chat template renders the messages as JSON, so a request is found only when lm-eval
built exactly the messages qreason sent; any other prompt (or other generation settings) fails the run.
OUT.json gets lm-eval's aggregate metrics and, per problem, the score its task gave.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager


class ReplayLM(LM):
    def __init__(self, texts: dict[str, str], max_tokens: int, temperature: float):
        super().__init__()
        self.texts = texts
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.served = 0

    @property
    def tokenizer_name(self) -> str:
        return "qreason-replay"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return "messages-as-json"

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return json.dumps(chat_history, sort_keys=True)

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            if (
                gen_kwargs.get("max_gen_toks") != self.max_tokens
                or gen_kwargs.get("temperature") != self.temperature
            ):
                raise AssertionError(f"generation settings differ from qreason's: {gen_kwargs}")
            if context not in self.texts:
                raise AssertionError(f"lm-eval built a prompt qreason never sent: {context[:300]}")
            out.append(self.texts[context])
            self.served += 1
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError("replay serves generations only")

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError("replay serves generations only")


def main(argv: list[str]) -> int:
    generations, export_dir, task, tokenizer, out = argv
    rows = [
        json.loads(line)
        for line in Path(generations).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    texts = {json.dumps(r["messages"], sort_keys=True): r["text"] for r in rows}
    sampling = rows[0]["sampling"]
    lm = ReplayLM(texts, sampling["max_tokens"], sampling["temperature"])
    manager = TaskManager(include_path=export_dir, metadata={"tokenizer": tokenizer})
    result = simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=manager,
        apply_chat_template=True,
        fewshot_as_multiturn=True,
        log_samples=True,
        bootstrap_iters=0,
    )
    per_problem = {
        s["doc"]["problem_id"]: [s["acc_strict"], s["acc_lenient"]] for s in result["samples"][task]
    }
    Path(out).write_text(
        json.dumps(
            {"metrics": result["results"][task], "per_problem": per_problem, "served": lm.served}, default=str
        ),
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
