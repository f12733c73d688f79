"""What the adapters train and are evaluated on: the Silver Bullet items of a variant (targeted), an
untargeted control set of the same size, and the held-out items both are evaluated on."""

from __future__ import annotations

from dataclasses import dataclass

from qreason.config.schema import RunConfig
from qreason.engines import GenerationRequest, make_request
from qreason.inputs.models import ResolvedModel
from qreason.records import SilverBulletItem, content_key
from qreason.stages.curate import dpo_row, sft_row
from qreason.store import RunStore

TARGETED, CONTROL = "targeted", "control"


SUFFIX = {TARGETED: "+sb", CONTROL: "+ctl"}


def read_items(store: RunStore) -> list[SilverBulletItem]:
    path = store.dataset_dir / "items.jsonl"
    if not path.is_file():
        return []
    return [
        SilverBulletItem.model_validate_json(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


@dataclass
class TrainSet:
    problems: list[tuple[str, str]]  # (task, problem_id)
    sft: list[dict]
    dpo: list[dict]

    def rows_for(self, mode: str) -> int:
        return (
            len(self.sft)
            if mode == "sft"
            else len(self.dpo)
            if mode == "dpo"
            else len(self.sft) + len(self.dpo)
        )


def targeted_set(items: list[SilverBulletItem]) -> TrainSet:
    return TrainSet(
        problems=[(it.task, it.problem_id) for it in items],
        sft=[sft_row(it.messages, it.sft_solution) for it in items],
        dpo=[dpo_row(it.messages, it.chosen, it.rejected) for it in items if it.chosen is not None],
    )


def _order(seed: int, *parts) -> str:
    return content_key("recover-control", seed, *parts)


def control_set(
    variant: str,
    target: TrainSet,
    all_items: list[SilverBulletItem],
    correct_base: dict,
    own: dict,
    seed: int,
    mode: str,
) -> TrainSet:
    """The same number of examples, on problems the analysis did not choose: seeded random problems the base
    solved that hold no Silver Bullet item of any variant or split. SFT: the base's solution; DPO: the base's
    solution against the variant's own (different) solution of the same problem and seed."""
    chosen_problems = {(it.task, it.problem_id) for it in all_items}
    pool = sorted(
        (k for k in correct_base if k[:2] not in chosen_problems), key=lambda k: _order(seed, variant, *k)
    )
    picked, sft, dpo, used = [], [], [], set()
    want_sft = len(target.sft) if mode != "dpo" else 0  # only the rows the mode trains on
    want_dpo = len(target.dpo) if mode != "sft" else 0
    for key in pool:
        if key[:2] in used or (len(sft) >= want_sft and len(dpo) >= want_dpo):
            continue
        base_gen = correct_base[key]
        took = False
        if len(sft) < want_sft:
            sft.append(sft_row(base_gen.messages, base_gen.text))
            took = True
        mine = own.get(key)
        if len(dpo) < want_dpo and mine is not None and mine.text.strip() != base_gen.text.strip():
            dpo.append(dpo_row(base_gen.messages, base_gen.text, mine.text))
            took = True
        if took:
            used.add(key[:2])
            picked.append(key[:2])
    return TrainSet(problems=picked, sft=sft, dpo=dpo)


@dataclass
class EvalSet:
    """The paired items of one variant: (task, problem, seed) -> the base's and the variant's generation."""

    base: dict
    own: dict

    def items(self, exclude: set) -> list[tuple]:
        return sorted(k for k in self.own if k in self.base and k[:2] not in exclude)


def eval_requests(
    name: str, model: ResolvedModel, items: list[tuple], ev: EvalSet, problems: dict, run_cfg: RunConfig
) -> list[GenerationRequest]:
    """The run's own prompts and seeds: each request repeats the variant's generation with another model."""
    return [
        make_request(name, model, problems[k[:2]], ev.own[k].messages, run_cfg.sampling, k[2]) for k in items
    ]
