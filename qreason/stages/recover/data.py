"""What the adapters train and are evaluated on: the Silver Bullet items of a variant (targeted: the very rows
``curate`` exports, so training the exported train split elsewhere reproduces the adapter), an untargeted
control set of the same size and about the same amount of text, and the held-out items every arm is evaluated
on."""

from __future__ import annotations

from dataclasses import dataclass

from qreason.config.schema import RunConfig
from qreason.engines import GenerationRequest, make_request
from qreason.inputs.models import ResolvedModel
from qreason.records import SilverBulletItem, content_key
from qreason.stages.curate import dpo_row, item_rows, sft_row
from qreason.store import RunStore

TARGETED, CONTROL, FP = "targeted", "control", "fp"


SUFFIX = {TARGETED: "+sb", CONTROL: "+ctl", FP: "+fp"}


def fp_mode(mode: str) -> str:
    """The full-precision arm's objective: the run's, except that distilling the base into itself changes
    nothing, so kd's full-precision arm fits the same answers (sft)."""
    return "sft" if mode == "kd" else mode


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
    sft: list[dict]  # curate's SFT rows (prompt, completion)
    dpo: list[dict]  # curate's DPO rows (prompt, chosen, rejected, prefix); kd: prefix + chosen, the frontier

    def chars_for(self, mode: str) -> int:
        """The characters of answer text the mode trains on (the budget beside the number of rows): sft the
        completions, dpo chosen and rejected, kd the completions and the frontier (chosen) rows."""
        sft = sum(len(_answer(r["completion"])) for r in self.sft)
        chosen = sum(len(_answer(r["chosen"])) for r in self.dpo)
        rejected = sum(len(_answer(r["rejected"])) for r in self.dpo)
        return sft if mode == "sft" else chosen + rejected if mode == "dpo" else sft + chosen

    def rows_for(self, mode: str) -> int:
        return (
            len(self.sft)
            if mode == "sft"
            else len(self.dpo)
            if mode == "dpo"
            else len(self.sft) + len(self.dpo)
        )


def targeted_set(items: list[SilverBulletItem]) -> TrainSet:
    """The train split's rows exactly as ``curate`` exports them (sft/train.jsonl, dpo/train.jsonl)."""
    rows = [item_rows(it) for it in items]
    return TrainSet(
        problems=[(it.task, it.problem_id) for it in items],
        sft=[r["sft"] for r in rows],
        dpo=[r["dpo"] for r in rows if r["dpo"] is not None],
    )


def _answer(turns: list[dict]) -> str:
    return "".join(str(t.get("content", "")) for t in turns)


# the control takes, for each targeted row in turn, the solution nearest in length among this many of the next
# randomly ordered candidates: the same number of examples and about the same amount of text, still a random
# draw of problems the base solved
LENGTH_WINDOW = 4


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
    solution against the variant's own (different) solution of the same problem and seed. kd: as many of the
    base's solutions as the targeted set has rows (a control has no located step, so no frontier)."""
    chosen_problems = {(it.task, it.problem_id) for it in all_items}
    pool = sorted(
        (k for k in correct_base if k[:2] not in chosen_problems), key=lambda k: _order(seed, variant, *k)
    )
    picked, sft, dpo, used = [], [], [], set()
    want_sft = len(target.sft) if mode != "dpo" else 0  # only the rows the mode trains on
    want_dpo = len(target.dpo) if mode not in ("sft", "kd") else 0
    if mode == "kd":
        want_sft = len(target.sft) + len(target.dpo)
    if not want_dpo:  # SFT rows only: each one matched in length to a targeted row
        lengths = [len(_answer(r["completion"])) for r in target.sft]
        if mode == "kd":
            lengths += [len(_answer(r["chosen"])) for r in target.dpo]
        remaining = list(pool)
        for length in lengths:
            window, problems = [], set()  # the next candidates, one per problem not used yet
            for key in remaining:
                if key[:2] in used or key[:2] in problems:
                    continue
                window.append(key)
                problems.add(key[:2])
                if len(window) == LENGTH_WINDOW:
                    break
            if not window:
                break
            key = min(window, key=lambda k: abs(len(correct_base[k].text) - length))
            remaining.remove(key)
            sft.append(sft_row(correct_base[key].messages, correct_base[key].text))
            used.add(key[:2])
            picked.append(key[:2])
        return TrainSet(problems=picked, sft=sft, dpo=dpo)
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
