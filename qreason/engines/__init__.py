"""Generation backends: requests in, completions out. One module per backend, each registered under its config's
``kind`` (``vllm``: the offline engine; ``openai``: an OpenAI-compatible endpoint; ``replay``: generations read from
a file); ``base`` holds the protocol every backend implements."""

from qreason.engines import openai, replay, vllm  # noqa: F401  (each registers its backend)
from qreason.engines.base import (BACKENDS, Backend, Completion, GenerationRequest, make_backend, make_request,
                                  register_backend, resolve_base, sampling_identity)

__all__ = ["BACKENDS", "Backend", "Completion", "GenerationRequest", "make_backend", "make_request",
           "register_backend", "resolve_base", "sampling_identity"]
