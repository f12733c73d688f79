"""Hostile and careless input, round two (issue 23): problem identity, the lm-eval export, children that
outlive a killed parent, decoded-size caps, variant names in paths, non-finite metrics, repair, and the
checks made before a run starts. Each test is named after the behaviour it checks; the section headings
give the issue's item numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_config
from fault_server import FAKE_VLLM_SERVER

from qreason.errors import UserError
from qreason.pipeline.plan import make_plan
from qreason.store import RunStore, mark_owned, mark_run_dir, seal


def replay_config(tmp_path: Path, tasks: str, extra: str = "") -> Path:
    """A run config on the replay backend (no model to load): plans in milliseconds."""
    (tmp_path / "replay.jsonl").write_text(json.dumps({"problem_id": "0", "text": "x"}) + "\n")
    return write_config(
        tmp_path / "run.yaml",
        f"name: r\noutput_dir: out\nbackend: {{kind: replay, path: replay.jsonl}}\ntasks:\n{tasks}{extra}",
    )


# --------------------------------------------------------------------------------- 1. problem identity


def test_one_task_twice_with_other_params_is_refused_with_one_line(tmp_path):
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


def test_one_spec_by_name_and_by_path_is_refused(tmp_path):
    from qreason.inputs import resources

    spec = resources.find("tasks", "synthetic.yaml")
    cfg = replay_config(tmp_path, f"  - {{name: synthetic, limit: 2}}\n  - {{name: '{spec}', limit: 2}}\n")
    with pytest.raises(UserError) as err:
        make_plan(cfg)
    assert "are both task 'synthetic'" in str(err.value)


def test_changed_task_params_in_an_existing_run_directory_are_refused(tmp_path):
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


def test_a_crafted_task_name_is_refused_and_never_reaches_python_source(tmp_path, monkeypatch):
    from qreason.inputs.tasks import load_spec

    crafted = "x'); import os; os.system('touch pwned'); ('"
    tasks = hostile_task_dir(tmp_path, crafted)
    with pytest.raises(UserError) as err:
        load_spec(str(tasks / "mytask.yaml"))
    assert "name: Value error, must be a slug" in str(err.value)


def test_export_writes_names_and_prompts_as_data(tmp_path, monkeypatch):
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
def test_lm_eval_loads_the_hostile_export_without_running_user_text(tmp_path, monkeypatch):
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


# --------------------------------------------------------------------------- 3. children die with qreason

PARENT = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
kind, tmp = sys.argv[2], Path(sys.argv[3])
if kind == "server":
    from qreason.config.schema import VLLMConfig
    from qreason.engines.vllm_server import VLLMServer
    class Fake(VLLMServer):
        def command(self):
            return [sys.executable, str(tmp / "fake_server.py"), "--served-model-name", self.served_name,
                    "--port", str(self.port)]
    server = Fake(VLLMConfig(), "m", "base", tmp / "server.log", record_path=tmp / "servers" / "base.json")
    server.__enter__()
    print(server.proc.pid, flush=True)
else:
    from qreason.workers.launch import run_worker, side_env_vars
    env = side_env_vars()
    env["PYTHONPATH"] = str(tmp) + ":" + env["PYTHONPATH"]
    run_worker({}, tmp / "job", tmp / "w.log", "w", print, python=Path(sys.executable), module="sleeper",
               stage="test", env=env, on_line=lambda line: print(line, flush=True))
time.sleep(600)
"""


def alive(pid: int) -> bool:
    """Running (not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until(predicate, limit_s: float = 120.0) -> bool:
    """Poll until ``predicate()`` holds; ``limit_s`` only ends a broken run, it measures nothing."""
    import time

    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize("kind", ["worker", "server"])
def test_children_die_when_qreason_is_killed(tmp_path, kind):
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO

    (tmp_path / "fake_server.py").write_text(FAKE_VLLM_SERVER)
    (tmp_path / "sleeper.py").write_text("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(REPO), kind, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert wait_until(lambda: not alive(child)), f"the {kind} outlived its killed parent"
    finally:
        parent.kill()
        if "child" in locals() and alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_rerun_stops_the_server_a_killed_run_left_and_nothing_else(tmp_path):
    """A server recorded in the run directory that survived (it ignored the death signal) is stopped by the
    next lm-eval stage; a record whose pid now belongs to another program leaves that program alone."""
    import os
    import signal
    import subprocess
    import sys

    from qreason.engines.vllm_server import _argv_hash, stop_leftover_servers

    (tmp_path / "fake_server.py").write_text(FAKE_VLLM_SERVER)
    servers = tmp_path / "servers"
    servers.mkdir()
    argv = [sys.executable, str(tmp_path / "fake_server.py"), "--served-model-name", "x", "--port", "0"]
    leftover = subprocess.Popen(argv, start_new_session=True)
    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        for name, proc in (("base", leftover), ("rtn", stranger)):
            record = {"pid": proc.pid, "port": 1, "argv": _argv_hash(argv)}
            (servers / f"{name}.json").write_text(json.dumps(record))
        assert stop_leftover_servers(servers) == ["base"]
        assert leftover.wait(timeout=60) is not None
        assert stranger.poll() is None and not list(servers.iterdir())
    finally:
        for proc in (leftover, stranger):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_a_server_port_answered_by_another_process_is_refused(tmp_path):
    import subprocess
    import sys

    from qreason.config.schema import VLLMConfig
    from qreason.engines.vllm_server import VLLMServer, free_port

    (tmp_path / "fake_server.py").write_text(FAKE_VLLM_SERVER)
    port = free_port()
    other = subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "fake_server.py"),
            "--served-model-name",
            "other",
            "--port",
            str(port),
        ]
    )

    class Fake(VLLMServer):
        def command(self):  # a server that fails to bind the taken port but stays up
            return [sys.executable, "-c", "import time; time.sleep(600)"]

    try:
        assert wait_until(lambda: _answers(port))
        with pytest.raises(UserError) as err:
            Fake(VLLMConfig(), "m", "base", tmp_path / "s.log", port=port).__enter__()
        assert f"port {port} is answered by another process" in str(err.value)
    finally:
        other.kill()
        other.wait()


def _answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
            return True
    except OSError:
        return False


# ------------------------------------------------------- 11. a target that cannot be served is recorded


@pytest.mark.skipif(
    not (Path(__file__).parent.parent / ".venv-bench/bin/python").is_file(), reason="no lm-eval"
)
def test_an_lm_eval_target_whose_server_does_not_start_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    import sys

    import qreason.stages.lm_eval.stage as stage
    from qreason.config.schema import LmEvalConfig, VLLMConfig
    from qreason.engines.vllm_server import VLLMServer

    def command(self):  # the damaged checkpoint: vLLM exits at once
        return [sys.executable, "-c", "raise SystemExit(3)"]

    served = []

    def evaluate(target, todo, *args):
        if target.name == "rtn+sb":
            with VLLMServer(VLLMConfig(), target.path, target.name, tmp_path / "s.log", where="lm_eval x"):
                pass
        served.append(target.name)
        return []

    monkeypatch.setattr(VLLMServer, "command", command)
    monkeypatch.setattr(stage, "_evaluate", evaluate)
    targets = [stage.LmEvalTarget("base", "/m", "fp-base"), stage.LmEvalTarget("rtn+sb", "/bad", "fp-bad")]
    targets.append(stage.LmEvalTarget("rtn", "/q", "fp-q"))
    summary = stage.run_lm_eval(
        RunStore(tmp_path / "run"), LmEvalConfig(tasks=["t1"]), VLLMConfig(), targets, "base"
    )
    assert served == ["base", "rtn"]
    (failure,) = summary.failed
    assert failure["variant"] == "rtn+sb" and "the vLLM server exited with code 3" in failure["error"]


# ------------------------------------------- 5 and 11. merged checkpoints: keyed by checkpoint, verified


def variant(name: str, fingerprint: str):
    from qreason.records import ModelVariant

    return ModelVariant(
        key=f"k-{name}",
        name=name,
        base_model="m",
        base_fingerprint="fb",
        method="rtn",
        path=f"/ck/{name}",
        fingerprint=fingerprint,
        created_at="now",
    )


def test_one_adapter_on_two_variants_gets_two_merged_checkpoints_and_two_lm_eval_keys(tmp_path):
    import qreason.stages.lm_eval.stage as stage
    from qreason.stages.recover import merged_dir
    from qreason.store import seal
    from qreason.summary import RecoverySummary, VariantRecovery

    a, b = variant("rtn", "fp-a"), variant("gptq", "fp-b")
    assert merged_dir(a, "adapter-key") != merged_dir(b, "adapter-key")
    dirs = []
    for v in (a, b):
        d = tmp_path / v.name
        d.mkdir()
        (d / "config.json").write_text("{}")
        seal(d)
        dirs.append(d)
    recovery = RecoverySummary(
        variants=[
            VariantRecovery.model_construct(
                variant=v.name,
                eval_variant=f"{v.name}+sb",
                adapter_key="adapter-key",
                merged_checkpoint=str(d),
            )
            for v, d in zip((a, b), dirs)
        ]
    )
    targets = stage.targets_for([variant("base", "fp-0"), a, b], recovery)
    assert [t.name for t in targets] == ["base", "rtn", "gptq", "rtn+sb", "gptq+sb"]
    assert targets[3].fingerprint != targets[4].fingerprint
    assert stage.result_key(targets[3], "t", "v", {}) != stage.result_key(targets[4], "t", "v", {})


def test_a_damaged_cached_checkpoint_is_not_reused(tmp_path):
    import qreason.stages.lm_eval.stage as stage
    from qreason.store import is_sealed, seal
    from qreason.summary import RecoverySummary, VariantRecovery

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"x" * 1000)
    assert not is_sealed(merged)  # a copy cut short before its marker was written
    seal(merged)
    assert is_sealed(merged)
    recovery = RecoverySummary(
        variants=[
            VariantRecovery.model_construct(
                variant="rtn", eval_variant="rtn+sb", adapter_key="k", merged_checkpoint=str(merged)
            )
        ]
    )
    assert len(stage.targets_for([variant("rtn", "fp")], recovery)) == 2
    (merged / "model.safetensors").write_bytes(b"x" * 10)  # truncated since
    assert not is_sealed(merged)
    assert [t.name for t in stage.targets_for([variant("rtn", "fp")], recovery)] == ["rtn"]


# ------------------------------------------------------------- 4. compressed replies: the cap is decoded


def test_a_gzip_reply_is_capped_after_decoding(tmp_path):
    """A 40 KB gzip body that inflates to 40 MiB is refused (the cap counts decoded bytes) by the HTTP client
    the judges and the OpenAI backend share; a small gzip reply still reads."""
    import asyncio
    import gzip

    import openai
    from fault_server import JsonServer

    from qreason.engines.openai_http import make_async_client

    def completion(text: str) -> bytes:
        return json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                ],
            }
        ).encode()

    class Gzip(JsonServer):
        def handle(self, h, body):
            text = body["messages"][0]["content"]
            payload = gzip.compress(completion("7" * (40 << 20) if text == "bomb" else "fine"))
            self.send(h, 200, payload, headers={"Content-Encoding": "gzip"})

    async def ask(url: str, text: str) -> str:
        client = make_async_client(url, "NO_SUCH_KEY_VAR", max_retries=0, timeout_s=60)
        try:
            reply = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": text}]
            )
            return reply.choices[0].message.content
        finally:
            await client.close()

    server = Gzip()
    server.thread.start()
    try:
        assert asyncio.run(ask(server.base_url, "small")) == "fine"
        with pytest.raises(openai.APIConnectionError):
            asyncio.run(ask(server.base_url, "bomb"))
    finally:
        server.httpd.shutdown()


# ---------------------------------------------------------------- 6. variant names are slugs, paths stay in


@pytest.mark.parametrize(
    "variant, why",
    [
        ("{method: rtn-w4a16, name: ../victim}", "'../victim' must be a slug"),
        ("{method: rtn-w4a16, name: a/b}", "'a/b' must be a slug"),
        ("{method: import, path: 'ck/..'}", "'..' must be a slug"),
    ],
)
def test_variant_names_that_would_leave_the_run_directory_are_refused(tmp_path, variant, why):
    cfg = replay_config(tmp_path, "  - {name: synthetic, limit: 2}\n", f"quantize:\n  - {variant}\n")
    with pytest.raises(UserError) as err:
        make_plan(cfg)
    assert why in str(err.value) and not (tmp_path / "out").exists()


def test_the_noise_floor_form_of_a_variant_name_is_accepted():
    from qreason.config.schema import check_variant_name

    for name in ("base~batch16", "base--batch16", "gptq-w4a16", "m.v2_x"):
        assert check_variant_name(name) == name


def test_every_path_built_from_a_name_stays_inside_the_run_directory(tmp_path):
    (tmp_path / "outside").mkdir()
    store = RunStore(tmp_path / "run")
    (tmp_path / "run" / "lm_eval").mkdir(parents=True)
    (tmp_path / "run" / "lm_eval" / "logs").symlink_to(tmp_path / "outside")
    assert store.place("lm_eval", "work", "rtn+sb") == tmp_path / "run" / "lm_eval" / "work" / "rtn+sb"
    for parts in (
        ("lm_eval", "work", "../../victim"),
        ("lm_eval", "a/b"),
        ("..",),
        ("lm_eval", "logs", "x.log"),
    ):
        with pytest.raises(UserError, match="cannot name a file here"):
            store.place(*parts)


# --------------------------------------------------- 7. a generation belongs to a variant: name + checkpoint


def test_two_variants_of_one_checkpoint_keep_their_own_generations(tmp_path):
    from qreason.inputs.models import ResolvedModel

    plan = make_plan(replay_config(tmp_path, "  - {name: synthetic, limit: 2}\n"))
    model = ResolvedModel("m", "/ck", "fp-same", "variant")
    a, b = plan.requests_for("rtn", model), plan.requests_for("rtn-again", model)
    assert not {r.key for r in a} & {r.key for r in b}
    assert [r.key for r in a] == [r.key for r in plan.requests_for("rtn", model)]  # stable


# ------------------------------------------------------------------ 8. non-finite lm-eval metrics


def test_a_nan_lm_eval_metric_is_stored_and_read_back(tmp_path):
    import math

    import qreason.stages.lm_eval.stage as stage
    from qreason.store import Table

    store = RunStore(tmp_path / "run")
    result = {
        "task": "t",
        "metrics": {"acc,none": float("nan"), "acc_stderr,none": float("inf"), "f1,none": float("-inf")},
        "samples_file": str(tmp_path / "run" / "s.jsonl"),
        "n_samples": 0,
    }
    record = stage._record(stage.LmEvalTarget("base", "/m", "fp"), "k1", "0.4", {}, result, store.dir)
    store.lm_eval.append([record])
    again = Table(store.lm_eval.path, type(record)).get("k1")  # read by a later command
    assert math.isnan(again.metrics["acc"]) and again.metrics["f1"] == float("-inf")
    assert again.stderr["acc"] == float("inf")
    assert store.repair() == {"lm_eval_results.jsonl": 0}


# --------------------------------------------------------------- 9. one repair, one lock, every table


def test_repair_covers_the_recovery_tables_under_the_run_lock(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    from qreason.store import RunLock, mark_run_dir

    store = RunStore(tmp_path / "run")
    mark_run_dir(store.dir, "run")
    for table in (store.grades, store.recovery_grades):
        table.path.parent.mkdir(parents=True, exist_ok=True)
        table.path.write_text('{"key": "torn"\n')

    def repair(path):
        env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
        return subprocess.run(
            [sys.executable, "-m", "qreason.cli", "repair", str(path)],
            capture_output=True,
            text=True,
            env=env,
        )

    with pytest.raises(UserError, match=f"qreason repair {store.dir}`"):
        RunStore(store.dir).recovery_grades.all()  # the hint names the run, not RUN/recovery
    with RunLock(store.dir):  # another process holds the run: repair of its recovery directory waits its turn
        held = repair(store.recovery_dir)
    assert held.returncode == 2 and store.recovery_grades.path.read_text() == '{"key": "torn"\n'
    done = repair(store.recovery_dir)
    assert done.returncode == 0, done.stderr
    assert (
        "grades.jsonl: 1 corrupt line" in done.stdout
        and "recovery/grades.jsonl: 1 corrupt line" in done.stdout
    )
    assert store.grades.path.read_text() == "" and store.recovery_grades.path.read_text() == ""
    assert repair(tmp_path).returncode == 2  # not a run directory: nothing touched


# ------------------------------------------------------------- 12. '$' in a name and the loss chart


def test_the_loss_chart_draws_a_dollar_in_a_name_literally():
    from qreason.report import figures

    uri = figures.loss_curves({"w4$\\cmd{$+sb sft": [[0, 1.0], [1, 0.5]], "w4$\\cmd{$+ctl sft": [[0, 1.2]]})
    assert uri.startswith("data:image/png;base64,")
    # every public function that draws (returns a data URI, or None when there is nothing to draw) renders
    # its text literally; the colour helpers draw nothing
    drawing = [
        name
        for name, fn in vars(figures).items()
        if callable(fn)
        and getattr(fn, "__module__", "") == figures.__name__
        and not name.startswith("_")
        and str(getattr(fn, "__annotations__", {}).get("return", "")).startswith("str")
    ]
    assert drawing and all(hasattr(getattr(figures, n), "__wrapped__") for n in drawing), drawing


# ---------------------------------------------- 10. what can be known is checked first; a stage that fails


def test_a_missing_training_environment_is_found_at_plan_time(tmp_path, monkeypatch):
    monkeypatch.setenv("QREASON_TRAIN_PYTHON", str(tmp_path / "no-such-python"))
    cfg = replay_config(tmp_path, "  - {name: synthetic, limit: 2}\n", "recover: {enabled: true}\n")
    with pytest.raises(UserError) as err:
        make_plan(cfg)
    assert "training environment" in str(err.value) and "no-such-python" in str(err.value)
    assert not (tmp_path / "out").exists()


class _Stage:
    section = None

    def __init__(self, name, fail=None, ran=None):
        self.name, self.fail, self.ran = name, fail, ran

    def enabled(self, cfg):
        return True

    def run(self, ctx):
        if self.fail:
            raise self.fail
        self.ran.append(self.name)


def test_a_stage_that_cannot_run_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    import qreason.pipeline.runner as runner

    ran: list[str] = []
    why = UserError("silver_bullet", "no sft examples for rtn (targeted)")
    monkeypatch.setattr(
        runner,
        "stages",
        lambda t0, env: [_Stage("recover", why), _Stage("lm_eval", ran=ran), _Stage("report", ran=ran)],
    )
    summary = runner.run(replay_config(tmp_path, "  - {name: synthetic, limit: 2}\n"))
    assert ran == ["lm_eval", "report"]
    assert summary.stage_failures == {"recover": "silver_bullet: no sft examples for rtn (targeted)"}
    stored = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert stored["stage_failures"] == summary.stage_failures
    # a stage the later ones depend on still ends the run
    monkeypatch.setattr(runner, "stages", lambda t0, env: [_Stage("grade", why), _Stage("report", ran=ran)])
    with pytest.raises(UserError):
        runner.run(replay_config(tmp_path, "  - {name: synthetic, limit: 2}\n"))


# ----------------------------------------------------- 13. one index beside the cache; readers create nothing


def test_prune_from_anywhere_keeps_checkpoints_of_runs_started_elsewhere(tmp_path, monkeypatch):
    from qreason.pipeline.plan import default_index
    from qreason.records import ModelVariant
    from qreason.store.retention import prune

    cache = tmp_path / "cache"
    monkeypatch.setenv("QREASON_CACHE", str(cache))
    monkeypatch.delenv("QREASON_INDEX")
    used, unused = cache / "quantized" / "used", cache / "quantized" / "unused"
    used.mkdir(parents=True)
    unused.mkdir()
    for d in (used, unused):
        mark_owned(d, "checkpoint", d.name)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    store = RunStore(project / "runs" / "demo")
    mark_run_dir(store.dir, "demo")
    store.variants.append(
        [
            ModelVariant(
                key="v",
                name="rtn",
                base_model="m",
                base_fingerprint="f",
                method="rtn",
                path=str(used),
                fingerprint="fp",
                created_at="now",
            )
        ]
    )
    index = default_index()
    assert index.path == cache / "index.sqlite"
    index.start("r1", store.dir, "demo", "h", {})
    index.finish("r1", "ok", None)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # prune from another directory sees the same index
    removed = prune(default_index(), older_than_days=30, dry_run=True)
    assert removed["checkpoints"] == [str(unused)] and removed["run_dirs"] == []
    assert list(empty.iterdir()) == []


def test_read_only_commands_create_nothing(tmp_path, monkeypatch):
    from qreason.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QREASON_INDEX", str(tmp_path / "idx" / "index.sqlite"))
    assert main(["runs"]) == 0
    assert main(["runs", "--index", str(tmp_path / "other" / "i.sqlite")]) == 0
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_run_index_is_one_line(tmp_path, capsys):
    from qreason.cli import main

    bad = tmp_path / "index.sqlite"
    bad.write_bytes(b"not a database" * 100)
    assert main(["runs", "--index", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "run index cannot be used" in err


# ------------------------------------------------------------------------------------------- low items


def test_recover_for_one_variant_keeps_the_others_in_the_recovery_summary():
    from qreason.stages.recover.stage import merge_recovery
    from qreason.summary import RecoverySummary, VariantRecovery

    def arm(variant, eval_variant, acc):
        return VariantRecovery.model_construct(variant=variant, eval_variant=eval_variant, accuracy_after=acc)

    old = RecoverySummary(
        variants=[arm("rtn", "rtn+sb", 0.5), arm("gptq", "gptq+sb", 0.6)], skipped={"awq": "x"}
    )
    new = RecoverySummary(variants=[arm("rtn", "rtn+sb", 0.7)])
    merged = merge_recovery(old, new)
    assert sorted((v.eval_variant, v.accuracy_after) for v in merged.variants) == [
        ("gptq+sb", 0.6),
        ("rtn+sb", 0.7),
    ]
    assert merged.skipped == {"awq": "x"}


def test_a_huge_synthetic_limit_is_refused_at_plan_time(tmp_path):
    cfg = replay_config(tmp_path, "  - {name: synthetic, limit: 1000000000}\n")
    with pytest.raises(UserError, match="at most 100000 problems"):
        make_plan(cfg)


def test_compare_refuses_two_runs_sharing_one_directory(tmp_path, capsys):
    from qreason.cli import main

    store = RunStore(tmp_path / "run")
    mark_run_dir(store.dir, "run")
    assert main(["compare", str(store.dir), str(tmp_path / "run" / ".")]) == 2
    assert "both are the run directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line, flags, message",
    [
        ('{"r": "Answer: 1", "a": NaN}', [], "must be a non-empty string or number"),
        ('{"r": "Answer: 1", "a": 1}', ["--workers", "0"], "--workers: must be at least 1"),
        ('{"r": "Answer: 1", "a": 1}', ["--timeout", "-1"], "--timeout: must be a positive number"),
        ('{"r": "Answer: 1", "a": 1}', ["--out", "."], "is a directory"),
    ],
)
def test_grade_file_refuses_bad_arguments_before_grading(tmp_path, monkeypatch, capsys, line, flags, message):
    from qreason.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text(line + "\n")
    argv = [
        "grade-file",
        "in.jsonl",
        "--response-field",
        "r",
        "--reference-field",
        "a",
        "--answer-type",
        "number",
    ]
    argv += flags if "--out" in flags else ["--out", "out.jsonl", *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()


def test_grade_file_writes_a_row_with_a_lone_surrogate(tmp_path):
    from qreason.stages.grade import Grader, grade_file

    (tmp_path / "in.jsonl").write_text('{"r": "Answer: 4 \\ud800", "a": "4"}\n')
    summary = grade_file(tmp_path / "in.jsonl", tmp_path / "out.jsonl", "r", "a", "number", Grader(10, 1))
    assert summary["rows"] == 1
    (row,) = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert row["r"] == "Answer: 4 \ufffd" and row["status"] in {"correct", "no_answer"}


@pytest.mark.parametrize(
    "header, meta, message",
    [
        ([1, 2], None, "not a safetensors file (bad header)"),
        ({"w": {"shape": "x"}}, None, "has no valid shape"),
        ({"__metadata__": {}}, None, "holds no tensors"),
        (
            {"w": {"shape": [2, 2]}},
            {"variant_fingerprint": "fp", "train_problems": "all"},
            "train_problems must",
        ),
    ],
)
def test_a_malformed_external_adapter_is_one_line(tmp_path, header, meta, message):
    from qreason.stages.recover.adapters import ADAPTER_META, check_adapter

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text('{"hidden_size": 2}')
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    blob = json.dumps(header).encode()
    (adapter / "adapter_model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob)
    if meta is not None:
        (adapter / ADAPTER_META).write_text(json.dumps(meta))
    v = variant("rtn", "fp").model_copy(update={"path": str(ck)})
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_adapter(adapter, v)


def test_prune_lists_recover_copies_no_kept_run_uses(tmp_path, monkeypatch):
    from qreason.store import RunIndex
    from qreason.store.retention import prune

    cache = tmp_path / "cache"
    monkeypatch.setenv("QREASON_CACHE", str(cache))
    for sub in ("dense/fp", "dense/fp-gone", "merged/m-used", "merged/m-gone"):
        (cache / "recover" / sub).mkdir(parents=True)
        seal(cache / "recover" / sub)
    store = RunStore(tmp_path / "run")
    mark_run_dir(store.dir, "run")
    store.variants.append([variant("rtn", "fp")])
    store.recovery_dir.mkdir()
    merged = str(cache / "recover" / "merged" / "m-used")
    (store.recovery_dir / "summary.json").write_text(
        json.dumps({"variants": [{"merged_checkpoint": merged}]})
    )
    index = RunIndex(tmp_path / "index.sqlite")
    index.start("r", store.dir, "run", "h", {})
    index.finish("r", "ok", None)
    removed = prune(index, older_than_days=30, dry_run=True)
    assert removed["checkpoints"] == [
        str(cache / "recover" / "dense" / "fp-gone"),
        str(cache / "recover" / "merged" / "m-gone"),
    ]


def test_a_corrupt_run_index_stops_the_run_before_it_writes_its_directory(tmp_path):
    from qreason.pipeline.runner import run
    from qreason.store import RunIndex

    bad = tmp_path / "index.sqlite"
    bad.write_bytes(b"not a database" * 100)
    cfg = replay_config(tmp_path, "  - {name: synthetic, limit: 2}\n")
    with pytest.raises(UserError, match="run index cannot be used"):
        run(cfg, index=RunIndex(bad))
    out = tmp_path / "out"
    assert not out.exists() or {p.name for p in out.iterdir()} <= {".lock"}


@pytest.mark.skipif(
    not (Path(__file__).parent.parent / ".venv-bench/bin/python").is_file(), reason="no lm-eval"
)
def test_an_lm_eval_tag_is_refused_before_the_run():
    from qreason.stages.lm_eval.stage import run_worker_check
    from qreason.workers.launch import BENCH

    with pytest.raises(UserError, match="ai2_arc: a tag of several lm-eval tasks"):
        run_worker_check(BENCH.python(), ["ai2_arc", "arc_easy"], [])
