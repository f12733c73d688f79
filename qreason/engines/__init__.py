"""Generation backends: requests in, completions out. One module per backend, each a kind in
``qreason.registry.BACKENDS`` (``vllm``: the offline engine; ``openai``: an OpenAI-compatible endpoint;
``replay``:
generations read from a file), loaded when a config asks for it; ``base`` holds the protocol every backend
implements, ``openai_http`` the HTTP helpers the OpenAI backend and the LLM judges share, ``vllm_server`` a
vLLM OpenAI-compatible server process, ``pooling`` the per-step scores of a process reward model (offline
engine or a server's ``/pooling`` endpoint)."""

from qreason.engines.base import (
    Backend,
    Completion,
    GenerationRequest,
    generates_on,
    make_backend,
    make_request,
    requests_for,
    resolve_base,
    sampling_identity,
)

__all__ = [
    "Backend",
    "Completion",
    "GenerationRequest",
    "generates_on",
    "make_backend",
    "make_request",
    "requests_for",
    "resolve_base",
    "sampling_identity",
]
