import pytest

from qreason.config.schema import load_config, parse_config
from qreason.errors import UserError


def error_of(text: str) -> str:
    with pytest.raises(UserError) as err:
        parse_config(text, "run.yaml")
    return str(err.value)


def test_minimal_config_gets_sensible_defaults():
    cfg = parse_config("name: demo\ntasks:\n  - name: synthetic\n", "run.yaml")
    assert cfg.model.path == "default" and cfg.backend.kind == "vllm"
    assert cfg.sampling.seeds == [0] and cfg.sampling.max_tokens > 0


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "name: demo\ntasks:\n  - name: gsm8k\nsampling:\n  temperature: -1\n",
            "run.yaml:5: sampling.temperature",
        ),
        (
            "name: demo\ntasks:\n  - name: gsm8k\n    limt: 3\n",
            "run.yaml:4: tasks.0.limt: unknown key (did you mean 'limit'?)",
        ),
        # a typo'd required key: the unknown key and its hint come first, not "tasks: Field required"
        ("name: demo\ntaks:\n  - name: gsm8k\n", "run.yaml:2: taks: unknown key (did you mean 'tasks'?)"),
        (
            "name: d\ntasks: [{name: a}]\nbackend: {kind: openai, base_url: u, model: m, tmeout: 3}\n",
            "run.yaml:3: backend.openai.tmeout: unknown key (did you mean 'timeout_s'?)",
        ),
        ("name: demo\ntasks: []\n", "run.yaml:2: tasks"),
        ("name: demo\ntasks:\n  - name: a\n   bad\n", "run.yaml:4: invalid YAML"),
        ("- just a list\n", "run.yaml: a run config must be a YAML mapping"),
        ("name: 'has space'\ntasks:\n  - name: a\n", "run.yaml:1: name"),
        ("name: d\ntasks:\n  - name: a\nsampling:\n  seeds: [1, 1]\n", "run.yaml:5: sampling.seeds"),
    ],
)
def test_errors_name_the_file_line_and_field(text, expected):
    message = error_of(text)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_relative_paths_resolve_against_the_config_directory(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "run.yaml"
    path.write_text("name: demo\noutput_dir: out\ntasks:\n  - name: gsm8k\n    data: ../data/x.jsonl\n")
    loaded = load_config(path)
    assert loaded.run_dir == tmp_path / "cfg" / "out"
    assert loaded.resolve(loaded.config.tasks[0].data) == tmp_path / "data" / "x.jsonl"


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
