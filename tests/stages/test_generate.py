"""The generation stage's scheduling: at temperature 0 (greedy decoding) the seeds of one prompt give one
text, so each prompt is generated once and its record stored under every seed; sampling sends every seed."""

from __future__ import annotations

from qreason.config.schema import SamplingConfig
from qreason.engines import Completion, GenerationRequest
from qreason.records import Generation
from qreason.stages.generate import run_generation
from qreason.store import Table


class Counting:
    """A backend that answers every request with its problem id and remembers what it was sent."""

    name, versions = "counting", {}

    def __init__(self):
        self.sent: list[GenerationRequest] = []

    def generate(self, requests, sampling):
        for r in requests:
            self.sent.append(r)
            yield r, Completion(text=f"answer to {r.problem_id}", finish_reason="stop")


def _requests(seeds) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            key=f"{p}-{s}",
            variant="base",
            model_fingerprint="fp",
            task="synthetic",
            problem_id=p,
            messages=[{"role": "user", "content": f"question {p}"}],
            seed=s,
        )
        for p in ("p0", "p1", "p2")
        for s in seeds
    ]


def test_greedy_decoding_generates_each_prompt_once_for_all_seeds(tmp_path):
    table = Table(tmp_path / "generations.jsonl", Generation)
    backend = Counting()
    stats = run_generation(
        table, _requests([0, 1, 2]), backend, SamplingConfig(temperature=0, seeds=[0, 1, 2])
    )
    assert sorted(r.problem_id for r in backend.sent) == ["p0", "p1", "p2"]  # one request per prompt
    assert stats.produced == 9 and {g.key for g in table.all()} == {
        f"p{i}-{s}" for i in range(3) for s in range(3)
    }
    by_problem = {}
    for g in table.all():
        by_problem.setdefault(g.problem_id, set()).add((g.text, g.sampling["seed"] == g.seed))
    assert all(v == {(f"answer to {p}", True)} for p, v in by_problem.items())


def test_sampling_sends_every_seed(tmp_path):
    table = Table(tmp_path / "generations.jsonl", Generation)
    backend = Counting()
    sampling = SamplingConfig(temperature=0.7, seeds=[0, 1])
    assert run_generation(table, _requests([0, 1]), backend, sampling).produced == 6
    assert len(backend.sent) == 6
