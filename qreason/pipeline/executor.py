"""Where a run's quantize and generate jobs execute.

``local`` (the default): in this process, one job after another, with at most one generation engine alive.
``ray``: on a Ray cluster. Each quantize job is a Ray task and each model's generation engine lives in a Ray
actor, both reserving the GPUs they need, so the jobs of a matrix run side by side as the cluster allows.
Either way the driver (this process) is the only writer of the run store: workers return records, the driver
appends them as they arrive, so the store is never written from two machines and a retried job cannot
duplicate records (``Table.append`` skips stored keys).

A lost worker is handled by Ray: a crashed quantize task is retried, a crashed engine actor is restarted and
its unfinished batches are sent again (``max_retries`` each). A batch that fails for good is counted as
failed; the run ends ``incomplete`` and the next run does only the missing work.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Iterator

from qreason import console
from qreason.engines import Backend, Completion, GenerationRequest, make_backend
from qreason.errors import UserError
from qreason.inputs.models import ResolvedModel
from qreason.stages.generate import GenerationStats, run_generation

if TYPE_CHECKING:
    from qreason.config.schema import BackendConfig, ExecutorConfig, RunConfig, SamplingConfig, VLLMConfig
    from qreason.records import Generation, ModelVariant
    from qreason.store import Table

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 512 * 2**20

# A generation job: the model and the requests still to do for it.
GenerateJob = tuple[ResolvedModel, list[GenerationRequest]]


class LocalExecutor:
    """Jobs in turn in this process. At most one generation engine is alive (each holds the model and its KV
    cache); it is reused while the same model is asked for. A backend passed in by the caller (``lent``)
    serves the model with fingerprint ``lent_fingerprint`` and is never closed here."""

    kind = "local"

    def __init__(self, cfg: RunConfig, lent: Backend | None = None, lent_fingerprint: str | None = None):
        self.cfg = cfg
        self.lent, self.lent_fingerprint = lent, lent_fingerprint
        self.current: Backend | None = None
        self.fingerprint: str | None = None
        self.engine_settings: dict[str, dict] = {}  # model -> what its engine resolved (environment.json)

    def quantize(self, jobs: list[tuple]) -> list[ModelVariant]:
        from qreason.stages.quantize import quantize

        return [quantize(*job) for job in jobs]

    def backend_for(self, model: ResolvedModel) -> Backend:
        if self.lent is not None and model.fingerprint == self.lent_fingerprint:
            backend = self.lent
        else:
            if self.current is None or self.fingerprint != model.fingerprint:
                self.close()
                log.info("starting the generation engine for %s", model.path, extra=console.LOG_ONLY)
                with console.waiting(f"engine {model.spec}: starting ({self.cfg.backend.kind})"):
                    self.current = make_backend(self.cfg.backend, model)
                self.fingerprint = model.fingerprint
            backend = self.current
        if getattr(backend, "settings", None):
            self.engine_settings[model.spec] = backend.settings
        return backend

    def generate(
        self,
        table: Table[Generation],
        jobs: list[GenerateJob],
        sampling: SamplingConfig,
        names: dict[str, str],
    ) -> GenerationStats:
        total = GenerationStats()
        for model, todo in jobs:
            stats = run_generation(
                table,
                todo,
                self.backend_for(model),
                sampling,
                desc=f"generate {names.get(model.fingerprint, model.spec)}",
            )
            total.produced, total.failed = total.produced + stats.produced, total.failed + stats.failed
            total.seconds += stats.seconds
        return total

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = self.fingerprint = None


def make_executor(cfg: RunConfig, lent: Backend | None = None, lent_fingerprint: str | None = None):
    if cfg.executor.kind == "ray":
        return RayExecutor(cfg)
    return LocalExecutor(cfg, lent, lent_fingerprint)


# ----------------------------------------------------------------------------------------------------- Ray

# Environment variables a worker needs to find what the driver finds (caches, offline mode, the quantization
# environment). Anything that looks like a credential is never shipped: Ray shows runtime environments.
_SHIPPED_PREFIXES = ("QREASON_", "HF_", "TRANSFORMERS_", "VLLM_")
_SECRET_WORDS = (
    "KEY",
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "PWD",
    "AUTH",
    "CREDENTIAL",
    "COOKIE",
    "SESSION",
    "PRIVATE",
    "CERT",
)
_URL_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#@]*@")  # scheme://user[:password]@host


def _looks_secret(name: str, value: str) -> bool:
    """A credential by its name (any part of it: ``DB_PASSWD``, ``QREASON_AUTH``) or a URL carrying one
    (``https://user:pw@mirror``)."""
    return any(w in name.upper() for w in _SECRET_WORDS) or bool(_URL_USERINFO.match(value.strip()))


def shipped_env() -> dict[str, str]:
    """The variables every Ray worker gets: qreason's, Hugging Face's, transformers' and vLLM's settings,
    never one that looks like a credential (Ray shows runtime environments in its dashboard and logs)."""
    shipped, dropped = {}, []
    for k, v in os.environ.items():
        if k.startswith(_SHIPPED_PREFIXES):
            if _looks_secret(k, v):
                dropped.append(k)
            else:
                shipped[k] = v
    if dropped:
        log.info("not passed to Ray workers (they look like credentials): %s", ", ".join(sorted(dropped)))
    return shipped


def engine_env(backend_cfg: BackendConfig) -> dict[str, str]:
    """What an engine actor needs beyond ``shipped_env``: the OpenAI backend's API key, named by
    ``api_key_env``. A worker on a cluster started elsewhere does not inherit the driver's environment, so it
    is sent to that actor alone (its runtime environment), never to the whole job and never into a record."""
    if backend_cfg.kind != "openai" or backend_cfg.api_key_env not in os.environ:
        return {}
    return {backend_cfg.api_key_env: os.environ[backend_cfg.api_key_env]}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(
            "executor: ray",
            "Ray is not installed in this environment (install the version in requirements/common.txt)",
        ) from None
    return ray


class EngineActor:
    """One model's generation engine inside a Ray worker. ``generate`` answers one batch and returns the
    completions with the backend's name and versions (recorded with every generation)."""

    def __init__(self, backend_cfg: VLLMConfig, model: ResolvedModel):
        self.backend = make_backend(backend_cfg, model)

    def generate(
        self, requests: list[GenerationRequest], sampling: SamplingConfig
    ) -> tuple[str, dict[str, str], list[Completion]]:
        done = dict((r.key, c) for r, c in self.backend.generate(requests, sampling))
        return self.backend.name, self.backend.versions, [done[r.key] for r in requests]


def _quantize_task(*job):
    from qreason.stages.quantize import quantize

    return quantize(*job)


def _batches(requests: list[GenerationRequest], size: int) -> list[list[GenerationRequest]]:
    """Consecutive batches of ``size`` per model, new answers and continuations never mixed: the same batches
    the local executor's engine would run, so results match it."""
    groups: dict[tuple[str, bool], list[GenerationRequest]] = defaultdict(list)
    for r in requests:
        groups[(r.model_fingerprint, r.messages[-1]["role"] == "assistant")].append(r)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


class RayBackend:
    """A ``Backend`` whose engines are Ray actors, one per model, created on first use. Batches of all models
    are sent at once and yielded in the order they finish, so engines of different models work in parallel."""

    def __init__(self, executor: RayExecutor):
        self.ex = executor
        self.name, self.versions = "ray", {}

    def generate(
        self, requests: list[GenerationRequest], sampling: SamplingConfig
    ) -> Iterator[tuple[GenerationRequest, Completion]]:
        ray = self.ex.ray
        pending = {}
        open_batches: Counter[str] = Counter()
        for batch in _batches(requests, self.ex.cfg.backend.batch_size):
            actor = self.ex.actor(batch[0].model_fingerprint)
            pending[actor.generate.remote(batch, sampling)] = batch
            open_batches[batch[0].model_fingerprint] += 1
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                batch = pending.pop(ready[0])
                try:
                    self.name, self.versions, completions = ray.get(ready[0])
                except (ray.exceptions.RayError, UserError) as exc:  # the job failed for good (retries spent)
                    message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                    log.warning(
                        "a batch of %d generations failed on the Ray cluster: %s", len(batch), message
                    )
                    completions = [Completion(error=message) for _ in batch]
                open_batches[batch[0].model_fingerprint] -= 1
                if not open_batches[batch[0].model_fingerprint]:
                    # a model's work is done: free its engine's CPUs/GPUs for the actors still waiting for
                    # them
                    self.ex.release(batch[0].model_fingerprint)
                yield from zip(batch, completions)
        finally:
            for ref in pending:  # interrupted: do not leave work queued on the cluster
                ray.cancel(ref)

    def close(self) -> None:
        pass


class RayExecutor:
    """Jobs on a Ray cluster: ``executor.address``, else ``$RAY_ADDRESS``, else a Ray instance started on this
    machine for the run (and stopped after it). Every node needs qreason's environments installed, and the
    quantized-checkpoint cache (``QREASON_CACHE``) must be on a filesystem all nodes share."""

    kind = "ray"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.ex: ExecutorConfig = cfg.executor
        self.ray = _import_ray()
        self.models: dict[str, ResolvedModel] = {}
        self.actors: dict = {}
        self.owned = False
        address = self.ex.address or os.environ.get("RAY_ADDRESS")
        if not self.ray.is_initialized():
            kwargs: dict = {
                "runtime_env": {"env_vars": shipped_env()},
                "log_to_driver": True,
                "configure_logging": False,
            }
            if address:  # connect (shutdown() at the end only disconnects; the cluster keeps running)
                self.ray.init(address=address, **kwargs)
            else:
                # "local": a new instance even where `ray start` left a cluster running. Records are small: a
                # modest object store works even where /dev/shm is tiny (containers).
                self.ray.init(
                    address="local",
                    num_cpus=self.ex.local_cpus or os.cpu_count(),
                    include_dashboard=False,
                    object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                    **kwargs,
                )
            self.owned = True  # a Ray session the caller started is left alone
        resources = self.ray.cluster_resources()
        self.has_gpus = resources.get("GPU", 0) > 0
        self.total = {"CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0)}
        self.cpus = self.ex.cpus_per_job or self._default_cpus()
        self._check_fits("CPU", self.cpus, "executor.cpus_per_job")
        log.info(
            "Ray executor: %s (%s CPUs, %s GPUs)",
            address or "local instance",
            resources.get("CPU", 0),
            resources.get("GPU", 0),
        )

    def _default_cpus(self) -> float:
        """1 CPU per job where GPUs do the work; on CPU-only clusters a whole node (the smallest)."""
        if self.has_gpus:
            return 1
        nodes = [n["Resources"].get("CPU", 0) for n in self.ray.nodes() if n.get("Alive")]
        return max(1, min((c for c in nodes if c > 0), default=1))

    def _check_fits(self, kind: str, need: float, what: str) -> None:
        """A job needing more than the whole cluster has would wait forever: say so instead."""
        if need > self.total[kind]:
            self.close()
            raise UserError(
                what, f"a job needs {need:g} {kind}s but the Ray cluster has {self.total[kind]:g}"
            )

    def _gpus(self, configured: float | None, default: float, what: str) -> float:
        gpus = configured if configured is not None else default if self.has_gpus else 0
        self._check_fits("GPU", gpus, what)
        return gpus

    def quantize(self, jobs: list[tuple]) -> list[ModelVariant]:
        """All quantize jobs at once, each a Ray task with its GPU; returns the variants in job order."""
        gpus = self._gpus(self.ex.gpus_per_quantize, 1, "executor.gpus_per_quantize")
        task = self.ray.remote(_quantize_task).options(
            num_cpus=self.cpus, num_gpus=gpus, max_retries=self.ex.max_retries
        )
        refs = [task.remote(*job) for job in jobs]
        try:
            return [self._get(ref) for ref in refs]
        except BaseException:
            for ref in refs:
                self.ray.cancel(ref, force=True)
            raise

    def _get(self, ref):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):
                raise exc.cause from None
            raise

    def actor(self, fingerprint: str):
        """The engine actor for a model (started on first use; Ray restarts it if its worker dies)."""
        if fingerprint not in self.actors:
            model = self.models[fingerprint]
            b = self.cfg.backend
            # an endpoint backend (openai) computes nothing on the worker: no GPUs unless configured
            per_engine = b.tensor_parallel_size * b.data_parallel_size if b.kind == "vllm" else 0
            gpus = self._gpus(self.ex.gpus_per_generate, per_engine, "executor.gpus_per_generate")
            options = {}
            if engine_env(b):
                options["runtime_env"] = {"env_vars": engine_env(b)}
            cls = self.ray.remote(EngineActor).options(
                num_cpus=self.cpus,
                num_gpus=gpus,
                max_restarts=self.ex.max_retries,
                max_task_retries=self.ex.max_retries,
                **options,
            )
            log.info("starting a Ray engine actor for %s", model.path)
            self.actors[fingerprint] = cls.remote(b, model)
        return self.actors[fingerprint]

    def release(self, fingerprint: str) -> None:
        actor = self.actors.pop(fingerprint, None)
        if actor is not None:
            self.ray.kill(actor)

    def backend_for(self, model: ResolvedModel) -> Backend:
        self.models[model.fingerprint] = model
        return RayBackend(self)

    def generate(
        self,
        table: Table[Generation],
        jobs: list[GenerateJob],
        sampling: SamplingConfig,
        names: dict[str, str],
    ) -> GenerationStats:
        for model, _ in jobs:
            self.models[model.fingerprint] = model
        todo = [r for _, requests in jobs for r in requests]
        return run_generation(
            table, todo, RayBackend(self), sampling, desc=f"generate {len(jobs)} model(s) on Ray"
        )

    def close(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        self.actors.clear()
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
            self.owned = False
