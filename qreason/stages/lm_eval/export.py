"""qreason's tasks as lm-eval tasks, and the helpers those tasks call at lm-eval time.

Two kinds of lm-eval task come from here:
- ``qreason_<task>`` (written by ``qreason export-lm-eval``): qreason's own step-by-step task reproduced
  exactly in lm-eval: the same problems (qreason's loader, from the local file, the hub or the synthetic
  generator), the same chat messages (optional worked example as one user/assistant exchange, then the
  question), the same generation settings, and scoring by qreason's own grader
  (``qreason.stages.grade.grade_answer``: strict and lenient).
- ``qreason_synthetic_mc`` (shipped in ``tasks/lm_eval/``): a small loglikelihood (multiple-choice) task on
  problems from qreason's synthetic generator. The Hugging Face hub is unreachable on qreason's CI machines
  and no standard lm-eval dataset is available locally, so the demo's lm-eval section runs this qreason-owned
  task.

This module runs in two environments: the main one (export) and lm-eval's (``.venv-bench``: the functions the
task YAMLs name through their utils modules). It imports no vLLM and no lm-eval at module level.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

from qreason.config.schema import SLUG
from qreason.errors import UserError
from qreason.inputs import synthetic
from qreason.store import write_atomic
from qreason.store.ownership import check_user_dir, claim_user_dir

EXPORT_KIND = "lm-eval tasks"  # the ownership marker's kind of an export directory

EXPORT_REVISION = 2  # 2: one fixed utils.py, per-task settings in the YAML metadata
TRUNCATION_NOTE = (
    "lm-eval hands a task only the generated text, not why generation stopped: a solution counts "
    "as truncated when its token count (by the tokenizer named in the task metadata) reaches "
    "max_gen_toks"
)


# ------------------------------------------------------------------------------ qreason_synthetic_mc
# (shipped)


def _first_step_choices(row: dict, others: list[str], rng: random.Random) -> tuple[list[str], int]:
    """The four choices of one problem: its correct first step, the same numbers with the other operation
    (right arithmetic, wrong reading of the problem), and the first steps of two other problems."""
    correct = row["reference_steps"][0]
    a, op, b = correct.split("=")[0].split()
    a, b = int(a), int(b)
    swapped = (
        f"{a} + {b} = {a + b}" if op != "+" else (f"{a} - {b} = {a - b}" if a > b else f"{a} * {b} = {a * b}")
    )
    choices = [correct, swapped]
    for step in others:
        if step not in choices and len(choices) < 4:
            choices.append(step)
    rng.shuffle(choices)
    return choices, choices.index(correct)


def synthetic_mc_rows(
    n: int = 100,
    min_steps: int = 1,
    max_steps: int = 2,
    seed: int = 1000,
    ops: list[str] | tuple[str, ...] = ("add", "sub"),
) -> list[dict]:
    """Synthetic problems as 4-way multiple choice on the first step ("Step 1: a + b = c"). A model that only
    copies the problem's numbers narrows it to two choices (the other two are other problems' first steps);
    one that reads "gives away" or "gets more" right picks the correct operation. Chance is 25 %."""
    rows = synthetic.generate(n=n, min_steps=min_steps, max_steps=max_steps, seed=seed, ops=ops)
    out = []
    for i, row in enumerate(rows):
        others = [rows[(i + k) % len(rows)]["reference_steps"][0] for k in range(1, min(len(rows), 8))]
        choices, gold = _first_step_choices(row, others, random.Random(f"qreason-synthetic-mc/{row['id']}"))
        out.append(
            {
                "id": row["id"],
                "question": row["question"],
                "choices": choices,
                "gold": gold,
                "steps": row["steps"],
            }
        )
    return out


def synthetic_mc_dataset(**metadata: Any) -> dict:
    """lm-eval ``custom_dataset`` of qreason_synthetic_mc: generator parameters come from the task
    metadata."""
    import datasets

    params = {k: metadata[k] for k in ("n", "min_steps", "max_steps", "seed", "ops") if k in metadata}
    return {"test": datasets.Dataset.from_list(synthetic_mc_rows(**params))}


# ------------------------------------------------------------------------- qreason_<task> (exported) at run
# time


def _spec(spec_json: str):
    from qreason.inputs.tasks import TaskSpec

    return TaskSpec.model_validate(json.loads(spec_json))


def task_dataset(spec_json: str, task_json: str, tokenizer: str | None = None, **_: Any) -> dict:
    """lm-eval ``custom_dataset`` of an exported task: qreason's own loader turns the raw rows (local file,
    hub or synthetic generator) into problems, first ``limit`` only, exactly as ``qreason run`` does. Each
    document carries what scoring needs (reference answer, answer type, the truncation rule)."""
    import datasets

    from qreason.config.schema import TaskConfig
    from qreason.inputs.tasks import spec_problems

    spec = _spec(spec_json)
    task = TaskConfig.model_validate(json.loads(task_json))
    # data paths were made absolute by the export, so the directory the loader resolves against does not
    # matter
    problems = spec_problems(spec, task, Path("/"))
    docs = [
        {
            "problem_id": p.problem_id,
            "question": p.question,
            "answer": p.answer,
            "answer_type": p.answer_type,
            "tokenizer": tokenizer or "",
        }
        for p in problems
    ]
    return {"test": datasets.Dataset.from_list(docs)}


def user_message(template: str, question: str) -> str:
    """The user turn qreason sends for a question: its prompt template (``tasks/prompts.yaml``, frozen into
    the export) with the question filled in, as ``qreason.inputs.tasks.build_messages`` does."""
    return template.replace("{question}", question)


_TOKENIZERS: dict[str, Any] = {}


def _token_count(tokenizer: str, text: str) -> int:
    if tokenizer not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[tokenizer] = AutoTokenizer.from_pretrained(tokenizer)
    return len(_TOKENIZERS[tokenizer](text, add_special_tokens=False)["input_ids"])


def score(doc: dict, text: str, max_gen_toks: int, timeout_s: int = 10) -> dict[str, float]:
    """qreason's grade of one lm-eval generation as lm-eval metrics: ``acc_strict`` (the status qreason's
    accuracy counts) and ``acc_lenient`` (its lenient verdict: the answer a reader would take when no marker
    states one)."""
    from math_verify.errors import TimeoutException  # a BaseException: "except Exception" would miss it

    from qreason.stages.grade import grade_answer

    finish = None
    if doc.get("tokenizer") and _token_count(doc["tokenizer"], text) >= max_gen_toks:
        finish = "length"
    try:
        verdict = grade_answer(text, finish, doc["answer"], doc["answer_type"], timeout_s)
        strict, lenient = verdict.status, verdict.lenient_status
    except (TimeoutException, Exception):  # noqa: BLE001 - as in qreason's grading: a grader_error
        strict = lenient = "grader_error"
    return {"acc_strict": float(strict == "correct"), "acc_lenient": float(lenient == "correct")}


# ------------------------------------------------------------------------------------------------------
# export

# The exported utils.py holds no user text and no path of this machine: every task of the export calls the
# same three functions, and what differs between tasks (spec, task settings, prompt, generation limit) is
# data in each task's YAML metadata, which lm-eval hands to ``dataset``.
UTILS = '''\
"""lm-eval functions of the qreason_* tasks in this directory. Written by `qreason export-lm-eval`; do not
edit.

They call qreason itself (its task loader, prompt templates and grader), so qreason and its grader's libraries
(math-verify, pydantic, pyyaml) must be importable where lm-eval runs: `pip install qreason`, or a checkout on
PYTHONPATH. Each task's settings are data in its YAML file (metadata: qreason_*).
"""

from qreason import lm_eval_tasks as _q


def dataset(**metadata):
    return _q.exported_dataset(**metadata)


def doc_to_text(doc):
    return doc["qreason_user"]


def process_results(doc, results):
    return _q.score(doc, results[0], doc["qreason_max_gen_toks"])
'''

TASK_NAME = SLUG


def exported_dataset(
    qreason_spec: str,
    qreason_task: str,
    qreason_prompt: str,
    qreason_max_gen_toks: int,
    qreason_system: str = "",
    **metadata: Any,
) -> dict:
    """lm-eval ``custom_dataset`` of an exported task: ``task_dataset`` with each document also carrying its
    user message (the prompt template filled in) and the generation limit, so the task's functions need no
    per-task code."""
    data = task_dataset(qreason_spec, qreason_task, **metadata)
    test = data["test"].map(
        lambda doc: {
            "qreason_user": user_message(qreason_prompt, doc["question"]),
            "qreason_max_gen_toks": int(qreason_max_gen_toks),
            "qreason_system": qreason_system,
        }
    )
    return {"test": test}


class _Function(str):
    """A reference to a function of the exported utils.py, dumped as lm-eval's ``!function`` YAML tag. Only
    values qreason builds are of this type: no user text ever becomes a tag."""


def _export_one(spec, task, sampling, prompt) -> dict:
    """The task YAML's mapping for one qreason task: settings as YAML values, functions as fixed tags."""
    name = spec.name
    if not TASK_NAME.fullmatch(name):
        raise UserError(
            f"task {name!r}", "an exported task name must be a slug (letters, digits, '.', '_', '-')"
        )
    messages_note = "worked example, then the question" if task.format_example else "the question alone"
    gen = {
        "until": [],
        "max_gen_toks": sampling.max_tokens,
        "temperature": sampling.temperature,
        "do_sample": sampling.temperature > 0,
    }
    if sampling.top_p < 1.0:
        gen["top_p"] = sampling.top_p
    samples = []
    if prompt.example:
        samples = [
            {
                "qreason_user": user_message(prompt.user, prompt.example["question"]),
                "answer": prompt.example["solution"],
            }
        ]
    return {
        "task": f"qreason_{name}",
        "custom_dataset": _Function("utils.dataset"),
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": _Function("utils.doc_to_text"),
        "doc_to_target": "answer",
        # a field name: lm-eval reads a description that names a document field as that field's value, and
        # would render any other text as a Jinja template
        "description": "qreason_system",
        "generation_kwargs": gen,
        "num_fewshot": 1 if task.format_example and prompt.example else 0,
        "fewshot_config": {"sampler": "first_n", "samples": samples},
        "process_results": _Function("utils.process_results"),
        "metric_list": [
            {"metric": "acc_strict", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_lenient", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {
            "version": float(EXPORT_REVISION),
            "qreason_messages": messages_note,
            "qreason_spec": json.dumps(spec.model_dump(), sort_keys=True),
            "qreason_task": json.dumps(task.model_dump(), sort_keys=True),
            "qreason_prompt": prompt.user,
            "qreason_system": prompt.system or "",
            "qreason_max_gen_toks": sampling.max_tokens,
        },
    }


def _dump(cfg: dict) -> str:
    dumper = type("Dumper", (yaml.SafeDumper,), {})
    dumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))
    return yaml.dump(cfg, Dumper=dumper, sort_keys=False, allow_unicode=True, width=110)


def _legacy_export(out_dir: Path) -> bool:
    """A directory an older qreason exported into (before the ownership marker): only its task files and
    utils.py, each with the header qreason writes."""
    heads = {"utils.py": '"""lm-eval functions of the qreason_* tasks', "qreason_": "# qreason task "}
    for p in out_dir.iterdir():
        if p.name == "__pycache__":
            continue
        head = heads["utils.py"] if p.name == "utils.py" else heads["qreason_"]
        if not (p.is_file() and (p.name == "utils.py" or p.name.startswith("qreason_"))):
            return False
        try:
            with open(p, encoding="utf-8") as fh:
                if not fh.read(len(head)) == head:
                    return False
        except (OSError, UnicodeDecodeError):
            return False
    return True


def export_tasks(
    out_dir: Path, tasks: list, sampling, base_dir: Path | None = None, force: bool = False
) -> list[Path]:
    """Write ``qreason_<task>.yaml`` for each task config and one ``utils.py``; returns the YAML paths.
    A non-empty ``out_dir`` qreason did not export into is refused (``store.ownership``) unless ``force``.

    ``tasks``: qreason ``TaskConfig``s (data paths already absolute or relative to ``base_dir``);
    ``sampling``:
    the ``SamplingConfig`` whose settings the generations use. Reproducing qreason's prompt exactly needs
    lm-eval's ``--apply_chat_template --fewshot_as_multiturn`` (the worked example is one user/assistant
    turn)."""
    from qreason.inputs.tasks import load_prompt, load_spec

    out_dir = Path(out_dir)
    legacy = out_dir.is_dir() and not out_dir.is_symlink() and _legacy_export(out_dir)
    if legacy or check_user_dir(out_dir, EXPORT_KIND, force):
        claim_user_dir(out_dir, EXPORT_KIND, "lm-eval tasks")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)  # --force: written among someone else's files, unmarked
    written = []
    for task in tasks:
        spec = load_spec(task.name, base_dir)
        if task.data and base_dir is not None and not Path(task.data).is_absolute():
            task = task.model_copy(update={"data": str((base_dir / task.data).resolve())})
        cfg = _export_one(spec, task, sampling, load_prompt(spec.prompt))
        head = (
            f"# qreason task {spec.name} as an lm-eval task. Written by `qreason export-lm-eval`.\n"
            "# Reproduce qreason's prompt exactly with: lm_eval --include_path THIS_DIR --tasks "
            f"qreason_{spec.name} --apply_chat_template --fewshot_as_multiturn ...\n"
            f"# Scoring: qreason's grader (Math-Verify). {TRUNCATION_NOTE}: pass it with\n"
            '#   --metadata \'{"tokenizer": "MODEL_PATH"}\' (without it, truncation is not detected).\n'
        )
        path = out_dir / f"qreason_{spec.name}.yaml"
        write_atomic(path, head + _dump(cfg))
        written.append(path)
    write_atomic(out_dir / "utils.py", UTILS)
    return written
