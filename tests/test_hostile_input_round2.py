"""Hostile and careless input, round two (issue 23): problem identity, the lm-eval export, children that
outlive a killed parent, decoded-size caps, variant names in paths, non-finite metrics, repair, and the
checks made before a run starts. Each test names the item of the issue it covers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_config

from qreason.errors import UserError
from qreason.pipeline.plan import make_plan
from qreason.store import RunStore, mark_run_dir


def replay_config(tmp_path: Path, tasks: str, extra: str = "") -> Path:
    """A run config on the replay backend (no model to load): plans in milliseconds."""
    (tmp_path / "replay.jsonl").write_text(json.dumps({"problem_id": "0", "text": "x"}) + "\n")
    return write_config(
        tmp_path / "run.yaml",
        f"name: r\noutput_dir: out\nbackend: {{kind: replay, path: replay.jsonl}}\ntasks:\n{tasks}{extra}",
    )


# --------------------------------------------------------------------------------- 1. problem identity


def test_item1_one_task_twice_with_other_params_is_refused_with_one_line(tmp_path):
    cfg = replay_config(
        tmp_path,
        "  - {name: synthetic, limit: 3, params: {ops: [add]}}\n"
        "  - {name: synthetic, limit: 3, params: {ops: [mul]}}\n",
    )
    with pytest.raises(UserError) as err:
        make_plan(cfg)
    assert "task entries must be unique (repeated: synthetic)" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_item1_one_spec_by_name_and_by_path_is_refused(tmp_path):
    from qreason.inputs import resources

    spec = resources.find("tasks", "synthetic.yaml")
    cfg = replay_config(tmp_path, f"  - {{name: synthetic, limit: 2}}\n  - {{name: '{spec}', limit: 2}}\n")
    with pytest.raises(UserError) as err:
        make_plan(cfg)
    assert "are both task 'synthetic'" in str(err.value)


def test_item1_changed_task_params_in_an_existing_run_directory_are_refused(tmp_path):
    """The run directory's problems come from ops [add]; the config now asks for [mul]: the same problem ids
    with other questions and answers would be graded against the stored references."""
    cfg = replay_config(tmp_path, "  - {name: synthetic, limit: 3, params: {ops: [add]}}\n")
    plan = make_plan(cfg)
    mark_run_dir(plan.run_dir, "r")
    RunStore(plan.run_dir).problems.append(plan.problems)
    assert make_plan(cfg).problems == plan.problems  # the same config plans again
    replay_config(tmp_path, "  - {name: synthetic, limit: 3, params: {ops: [mul]}}\n")
    with pytest.raises(UserError) as err:
        make_plan(cfg)
    assert "holds problem synthetic/s0-00000 with another question or answer" in str(err.value)
    assert RunStore(plan.run_dir).problems.all() == plan.problems


# ------------------------------------------------------------------------------ 2. the lm-eval export


def hostile_task_dir(tmp_path: Path, name: str) -> Path:
    """A user task directory: a synthetic task called ``name`` whose prompt starts like an lm-eval code
    reference and whose system prompt is a Jinja expression."""
    tasks = tmp_path / "user_tasks"
    tasks.mkdir()
    (tasks / "mytask.yaml").write_text(
        f"name: {json.dumps(name)}\nanswer_type: number\nsource: {{synthetic: {{max_steps: 2}}}}\n"
        "prompt: hostile\n"
    )
    (tasks / "prompts.yaml").write_text(
        'hostile:\n  system: "{{ 7 * 7 }} system"\n  user: "!function evil.run\\n{question}"\n'
        '  example: {question: "!function evil.run", solution: "!function evil.run"}\n'
    )
    return tasks


def test_item2_a_crafted_task_name_is_refused_and_never_reaches_python_source(tmp_path, monkeypatch):
    from qreason.inputs.tasks import load_spec

    crafted = "x'); import os; os.system('touch pwned'); ('"
    tasks = hostile_task_dir(tmp_path, crafted)
    with pytest.raises(UserError) as err:
        load_spec(str(tasks / "mytask.yaml"))
    assert "name: Value error, must be a slug" in str(err.value)


def test_item2_export_writes_names_and_prompts_as_data(tmp_path, monkeypatch):
    """An ordinary name with a dash (a SyntaxError in the old utils.py), a prompt starting with `!function`
    (an lm-eval code reference in the old YAML): the YAML holds them as plain strings, utils.py is the same
    for every export and names no path of this machine."""
    import yaml

    from qreason.config.schema import SamplingConfig, TaskConfig
    from qreason.stages.lm_eval.export import UTILS, export_tasks

    tasks = hostile_task_dir(tmp_path, "gsm8k-mini")
    monkeypatch.setenv("QREASON_TASKS_PATH", str(tasks))
    out = tmp_path / "export"
    (path,) = export_tasks(out, [TaskConfig(name="mytask", limit=3, format_example=True)], SamplingConfig())
    assert path.name == "qreason_gsm8k-mini.yaml"
    utils = (out / "utils.py").read_text()
    assert utils == UTILS and "gsm8k" not in utils and str(Path.cwd()) not in utils and "/work" not in utils
    compile(utils, "utils.py", "exec")
    tags = []

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: tags.append(node.value) or node.value)
    cfg = yaml.load(path.read_text(), Loader=Loader)
    assert sorted(tags) == ["utils.dataset", "utils.doc_to_text", "utils.process_results"]
    assert cfg["metadata"]["qreason_prompt"] == "!function evil.run\n{question}"
    assert cfg["fewshot_config"]["samples"][0]["answer"] == "!function evil.run"


@pytest.mark.skipif(
    not (Path(__file__).parent.parent / ".venv-bench/bin/python").is_file(), reason="no lm-eval"
)
def test_item2_lm_eval_loads_the_hostile_export_without_running_user_text(tmp_path, monkeypatch):
    import subprocess

    from qreason.config.schema import SamplingConfig, TaskConfig
    from qreason.stages.lm_eval.export import export_tasks
    from qreason.workers.launch import side_env_vars

    tasks = hostile_task_dir(tmp_path, "gsm8k-mini")
    monkeypatch.setenv("QREASON_TASKS_PATH", str(tasks))
    out = tmp_path / "export"
    export_tasks(out, [TaskConfig(name="mytask", limit=2, format_example=True)], SamplingConfig())
    marker = tmp_path / "pwned"
    (out / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef run(*a): return ''\n")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, sys\n"
        "from lm_eval.tasks import TaskManager, get_task_dict\n"
        "task = get_task_dict(['qreason_gsm8k-mini'], TaskManager(include_path=sys.argv[1]))"
        "['qreason_gsm8k-mini']\n"
        "doc = list(task.test_docs())[0]\n"
        "print(json.dumps({'text': task.doc_to_text(doc), 'system': task.resolve_field(doc, "
        "task.config.description), 'shots': [task.doc_to_text(s) for s in task.config.fewshot_config"
        ".samples]}))\n"
    )
    done = subprocess.run(
        [str(Path(__file__).parent.parent / ".venv-bench/bin/python"), str(probe), str(out)],
        capture_output=True,
        text=True,
        env=side_env_vars(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["text"].startswith("!function evil.run\n") and got["system"] == "{{ 7 * 7 }} system"
    assert got["shots"] == ["!function evil.run\n!function evil.run"]
    assert not marker.exists()
