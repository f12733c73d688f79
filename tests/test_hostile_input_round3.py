"""Hostile and careless input, round three (issue 31): qreason never deletes or overwrites what it did not
create or what a live run still uses, interrupts reach side environments at once, and untrusted JSON is
parsed with bounds. Every test uses a temporary cache and index."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import write_config
from fault_server import FaultServer

from qreason.records import ModelVariant
from qreason.store import RunIndex, RunLock, RunStore, mark_owned, mark_run_dir, seal


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("QREASON_CACHE", str(root))
    monkeypatch.setenv("QREASON_INDEX", str(tmp_path / "index.sqlite"))
    return root


def variant(name: str, path: Path | str, fingerprint: str = "fp", method: str = "rtn") -> ModelVariant:
    return ModelVariant(
        key=f"v-{name}",
        name=name,
        base_model="m",
        base_fingerprint="f",
        method=method,
        path=str(path),
        fingerprint=fingerprint,
        created_at="now",
    )


def finished_run(index: RunIndex, run_dir: Path, run_id: str = "r", old: bool = False) -> RunStore:
    store = RunStore(run_dir)
    mark_run_dir(store.dir, run_dir.name)
    index.start(run_id, store.dir, run_dir.name, "h", {})
    index.finish(run_id, "ok", None)
    if old:
        with index._connect() as db:
            db.execute(
                "UPDATE runs SET started_at = '2020-01-01T00:00:00+00:00', finished_at = "
                "'2020-01-01T00:00:00+00:00' WHERE run_id = ?",
                (run_id,),
            )
    return store


def checkpoint(path: Path) -> Path:
    """A cached checkpoint as qreason makes one: with its ownership marker."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    mark_owned(path, "checkpoint", path.name)
    return path


# ------------------------------------------------------------------------------- prune and live runs


@pytest.mark.parametrize("days", ["0", "-1", "nan", "-inf"])
def test_prune_refuses_an_age_that_is_not_positive(cache, days, capsys):
    from qreason.cli import main

    assert main(["prune", f"--older-than={days}", "--yes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--older-than" in err[0] and "positive" in err[0]


def test_prune_next_to_a_running_run_leaves_it_and_the_run_finishes_ok_with_every_record(
    tmp_path, cache, monkeypatch
):
    """A real run holds its lock while its endpoint is held back; prune (its rows made old) deletes nothing
    of it, and the run then finishes ok with all its generations, its directory and its index row."""
    from qreason.pipeline.runner import run
    from qreason.store.retention import prune

    release, asked = threading.Event(), threading.Event()

    def reply(body: dict) -> str:
        asked.set()
        release.wait(60)
        return "Step 1: 2 + 3 = 5\nThe final answer is \\boxed{5}."

    cfg = write_config(
        tmp_path / "c.yaml",
        f"""
name: live
output_dir: {tmp_path / "runs" / "live"}
model: {{path: m-good}}
tasks: [{{name: synthetic, limit: 4}}]
sampling: {{max_tokens: 64}}
backend: {{kind: openai, base_url: "BASE", max_retries: 0}}
curate: {{enabled: false}}
""",
    )
    index = RunIndex(tmp_path / "index.sqlite")
    result: dict = {}
    with FaultServer([], content=reply) as server:
        cfg.write_text(cfg.read_text().replace("BASE", server.base_url))
        thread = threading.Thread(target=lambda: result.setdefault("summary", run(cfg, index=index)))
        thread.start()
        try:
            assert asked.wait(120), "the run never reached its endpoint"
            run_dir = tmp_path / "runs" / "live"
            with index._connect() as db:  # the run started long ago, as far as its age goes
                db.execute("UPDATE runs SET started_at = '2020-01-01T00:00:00+00:00'")
            removed = prune(index, 1, dry_run=False)
            assert removed["run_dirs"] == [] and removed["live"] == [str(run_dir.resolve())]
            assert (run_dir / "config.yaml").is_file() and (run_dir / "problems.jsonl").is_file()
            assert [r["status"] for r in index.list()] == ["running"]
        finally:
            release.set()
            thread.join(120)
    summary = result["summary"]
    assert summary.generations.failed == 0 and len(RunStore(run_dir).generations) == 4
    assert [r["status"] for r in index.list()] == ["ok"]


def test_a_held_run_lock_keeps_the_run_directory_whatever_its_index_row_says(tmp_path, cache):
    from qreason.store.retention import prune

    index = RunIndex(tmp_path / "index.sqlite")
    store = finished_run(index, tmp_path / "runs" / "old", old=True)
    with RunLock(store.dir):  # a re-run of the same directory in progress
        removed = prune(index, 30, dry_run=False)
        assert removed["run_dirs"] == [] and store.dir.is_dir()
    assert prune(index, 30, dry_run=False)["run_dirs"] == [str(store.dir.resolve())]
    assert not store.dir.exists() and index.list() == []


def test_prune_never_lists_or_deletes_a_cache_folder_qreason_did_not_make(tmp_path, cache):
    from qreason.store.retention import prune

    index = RunIndex(tmp_path / "index.sqlite")
    finished_run(index, tmp_path / "runs" / "r")
    foreign = [
        cache / "quantized" / "mine",
        cache / "recover" / "dense" / "x",
        cache / "recover" / "merged" / "y",
    ]
    for d in foreign:
        d.mkdir(parents=True)
        (d / "notes.txt").write_text("mine")
    ours = checkpoint(cache / "quantized" / "k1")
    removed = prune(index, 30, dry_run=False)
    assert removed["checkpoints"] == [str(ours)] and not ours.exists()
    assert removed["unmarked"] == sorted(map(str, foreign))
    assert all((d / "notes.txt").read_text() == "mine" for d in foreign)


def test_prune_keeps_every_checkpoint_a_kept_run_references_before_its_summary_exists(tmp_path, cache):
    """The merged checkpoints of every arm (targeted, control, full precision) a run recorded when its
    recover stage planned them are kept, with no recovery summary written yet."""
    from qreason.store.retention import prune

    index = RunIndex(tmp_path / "index.sqlite")
    store = finished_run(index, tmp_path / "runs" / "r")
    merged = cache / "recover" / "merged"
    arms = [checkpoint(merged / name) for name in ("targeted", "control", "fp")]
    unused = checkpoint(merged / "other")
    store.refer(arms)
    assert not (store.recovery_dir / "summary.json").exists()
    assert prune(index, 30, dry_run=True)["checkpoints"] == [str(unused)]


def test_prune_keeps_every_merged_checkpoint_of_an_older_run_without_a_recovery_summary(tmp_path, cache):
    from qreason.store.retention import prune

    index = RunIndex(tmp_path / "index.sqlite")
    store = finished_run(index, tmp_path / "runs" / "r")
    store.recovery_dir.mkdir()  # its recover stage started; no summary, no recorded references
    checkpoint(cache / "recover" / "merged" / "m1")
    assert prune(index, 30, dry_run=True)["checkpoints"] == []


def test_prune_while_a_run_is_live_deletes_no_cached_checkpoint(tmp_path, cache):
    from qreason.store.retention import prune

    index = RunIndex(tmp_path / "index.sqlite")
    store = finished_run(index, tmp_path / "runs" / "r")
    ck = checkpoint(cache / "quantized" / "just-made")  # made by the live run, not recorded yet
    with RunLock(store.dir):
        removed = prune(index, 30, dry_run=False)
    assert removed["checkpoints"] == [] and ck.is_dir()


# ------------------------------------------------------------------------ the cache moved (read-time paths)


def test_a_run_reads_its_quantized_checkpoint_where_the_cache_is_now(tmp_path, cache, monkeypatch):
    """variants.jsonl was written with the old cache's path; after QREASON_CACHE moved, the record is read
    with the checkpoint's present place, so recover finds it (no "checkpoint missing") and prune keeps it."""
    from qreason.store.retention import prune

    old = tmp_path / "old-cache" / "quantized" / "key1"
    store = RunStore(tmp_path / "runs" / "r")
    store.variants.append([variant("rtn", old)])
    moved = checkpoint(cache / "quantized" / "key1")
    [read] = RunStore(store.dir).variants.all()
    assert read.path == str(moved) and Path(read.path).is_dir()
    index = RunIndex(tmp_path / "index.sqlite")
    finished_run(index, store.dir)
    assert prune(index, 30, dry_run=True)["checkpoints"] == []


def test_lm_eval_reads_a_moved_merged_checkpoint(tmp_path, cache):
    from types import SimpleNamespace

    from qreason.stages.lm_eval.stage import targets_for

    merged = cache / "recover" / "merged" / "mk"
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"x")
    seal(merged)
    stored = str(tmp_path / "old" / "recover" / "merged" / "mk")  # the path the summary was written with
    rec = SimpleNamespace(variant="rtn", eval_variant="rtn+sb", merged_checkpoint=stored, adapter_key="a")
    recovery = SimpleNamespace(variants=[rec])
    targets = targets_for([variant("rtn", "/q")], recovery)
    assert [t.path for t in targets] == ["/q", str(merged)]
