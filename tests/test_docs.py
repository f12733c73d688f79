"""The README and docs/ show only commands and config keys that exist: every ``qreason ...`` command in a code
block or an inline code span names a real subcommand and only its real options, and every key of a YAML block
in docs/configuration.md is a field of the run config's schema. Runs on whatever docs exist."""

import re
import shlex
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from qreason.cli import build_parser
from qreason.config.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
SHELLISH = {"", "bash", "sh", "shell", "console", "cron", "ini"}


def _blocks(text: str, langs: set[str]) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang in langs]


def _command_lines(text: str) -> list[str]:
    """Lines of shell code blocks (continuations joined) and inline code spans of prose."""
    out = []
    for body in _blocks(text, SHELLISH):
        lines = body.replace("\\\n", " ").splitlines()
        prompted = [line for line in lines if line.startswith("$ ")]
        out += prompted or lines  # a console transcript: only its "$ " lines are commands, the rest output
    prose = FENCE.sub("", text)
    out += INLINE.findall(prose)
    return out


def _invocations(line: str) -> list[list[str]]:
    """The argument lists of each qreason invocation on one line: ``qreason ...``, ``PATH/bin/qreason ...`` or
    ``python -m qreason.cli ...``, one per command of a pipeline or ``&&`` chain, comments cut off."""
    found = []
    for segment in re.split(r"&&|\|\||[;|]", line.split(" #")[0]):
        try:
            words = shlex.split(segment, comments=True)
        except ValueError:
            continue
        while words and (words[0] in ("$", "time", "env") or re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0])):
            words = words[1:]  # a prompt, `time`, VAR=value before the command
        if not words:
            continue
        if words[0] == "qreason" or words[0].endswith("/bin/qreason"):
            found.append(words[1:])
        elif Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "qreason.cli"]:
            found.append(words[3:])
    return found


def _shown_commands() -> list[tuple[str, list[str]]]:
    shown = []
    for doc in DOCS:
        for line in _command_lines(doc.read_text(encoding="utf-8")):
            shown += [(f"{doc.name}: {line.strip()}", args) for args in _invocations(line)]
    return shown


def _options(parser) -> set[str]:
    return set(parser._option_string_actions)


def _check_command(args: list[str]) -> str | None:
    """Why the command is wrong, or None."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    words = [w.strip("[]") for w in args]
    while words and words[0].startswith("-"):
        if words[0].split("=")[0] not in _options(parser):
            return f"no global option {words[0]}"
        words = words[1:]
    if not words or words[0] in ("...", "…") or words[0].isupper() or words[0].startswith("<"):
        return None  # `qreason --help`, `qreason -v ...`, `qreason COMMAND --help`, `qreason <command>`
    name, rest = words[0], words[1:]
    if name not in sub.choices:
        return f"no command {name!r}"
    known = _options(sub.choices[name])
    for word in rest:
        if word.startswith("-") and not re.fullmatch(r"-\d[\d.]*", word):
            if word.split("=")[0] not in known:
                return f"{name} has no option {word}"
    return None


def test_the_docs_show_commands():
    # the parser of shell lines finds the README's commands (a test that finds nothing checks nothing)
    names = {args[0] for _, args in _shown_commands() if args and not args[0].startswith("-")}
    assert {"run", "runs", "report"} <= names


def test_every_shown_command_exists():
    wrong = [f"{where}: {why}" for where, args in _shown_commands() if (why := _check_command(args))]
    assert not wrong, "\n".join(wrong)


def test_the_command_check_catches_mistakes():
    assert _check_command(["run", "configs/demo.yaml"]) is None
    assert _check_command(["-v", "run", "configs/demo.yaml"]) is None
    assert _check_command(["recover", "RUN", "--no-control"]) is None
    assert _check_command(["runz"]) == "no command 'runz'"
    assert _check_command(["run", "x.yaml", "--fast"]) == "run has no option --fast"
    assert _invocations("QREASON_RUNS=/d .venv/bin/qreason run c.yaml >> log 2>&1 || echo x") == [
        ["run", "c.yaml", ">>", "log", "2>&1"]
    ]
    assert _invocations("pip install qreason") == []
    assert _invocations("$ qreason runs --json | head") == [["runs", "--json"]]
    transcript = "```console\n$ qreason --version\nqreason 0.1.0\n```\n"
    assert [_invocations(line) for line in _command_lines(transcript)] == [[["--version"]]]


# ------------------------------------------------------------------------------------- config keys


def _models(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation can hold (through unions, lists, Annotated and Optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is dict:
        return []  # free-form mappings (overrides, engine_args, params, ...)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated) or origin is not None:
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    return []


def _unknown_keys(value, models: list[type[BaseModel]], where: str) -> list[str]:
    if not models:
        return []
    if isinstance(value, list):
        return [k for item in value for k in _unknown_keys(item, models, where)]
    if not isinstance(value, dict):
        return []  # shorthands: `executor: ray`, `lm_eval: [arc_easy]`
    unknown = []
    for key, sub in value.items():
        fields = [m.model_fields[key] for m in models if key in m.model_fields]
        if not fields:
            unknown.append(f"{where}{key}")
            continue
        inner = [m for f in fields for m in _models(f.annotation)]
        unknown += _unknown_keys(sub, inner, f"{where}{key}.")
    return unknown


def _config_blocks() -> list[dict]:
    page = ROOT / "docs" / "configuration.md"
    if not page.is_file():
        pytest.skip("no docs/configuration.md")
    blocks = [yaml.safe_load(b) for b in _blocks(page.read_text(encoding="utf-8"), {"yaml", "yml"})]
    return [b for b in blocks if isinstance(b, dict)]


def test_every_documented_config_key_exists():
    blocks = _config_blocks()
    assert blocks, "docs/configuration.md shows no YAML"
    unknown = [k for b in blocks for k in _unknown_keys(b, [RunConfig], "")]
    assert not unknown, f"keys in docs/configuration.md that the schema does not know: {unknown}"


def test_the_key_check_catches_mistakes():
    assert _unknown_keys({"sampling": {"max_tokens": 5}}, [RunConfig], "") == []
    assert _unknown_keys({"sampling": {"max_tokenz": 5}}, [RunConfig], "") == ["sampling.max_tokenz"]
    assert _unknown_keys({"quantize": [{"method": "x", "calibration": {"n": 1}}]}, [RunConfig], "") == [
        "quantize.calibration.n"
    ]
    assert _unknown_keys({"backend": {"kind": "openai", "base_url": "u"}}, [RunConfig], "") == []


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move reference material to docs/"
