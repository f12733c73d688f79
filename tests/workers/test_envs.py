"""Finding, creating and checking the side environments (``qreason setup`` / ``qreason doctor``): where the
workers look, what setup redoes, the link that makes a side environment run this qreason, and what doctor
tells a user whose environments are missing. The environments here are bare virtualenvs (no downloads); the
full build is bench/wheel_install.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qreason.cli import main
from qreason.errors import UserError
from qreason.workers import envs, launch
from qreason.workers.launch import QUANT, TRAIN


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """qreason as a wheel install sees it: no checkout, side environments under $QREASON_ENVS."""
    monkeypatch.setattr(launch, "IS_CHECKOUT", False)
    monkeypatch.setenv("QREASON_ENVS", str(tmp_path / "envs"))
    for env in launch.SIDE_ENVS:
        monkeypatch.delenv(env.variable, raising=False)
    return tmp_path / "envs"


def bare_venv(where: Path) -> Path:
    """A virtualenv with nothing installed (the stdlib's venv, no pip: a second or two)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    return where / "bin" / "python"


def test_an_installed_qreason_looks_in_one_place_and_names_the_fix(installed):
    assert QUANT.default_dir == installed / "quant"
    assert QUANT.candidates() == [installed / "quant" / "bin" / "python"]
    with pytest.raises(UserError) as exc:
        TRAIN.python()
    message = str(exc.value)
    assert str(installed / "train" / "bin" / "python") in message
    assert "qreason setup train" in message and "QREASON_TRAIN_PYTHON" in message


def test_the_variable_overrides_and_a_checkout_keeps_its_venvs(monkeypatch, tmp_path, installed):
    monkeypatch.setenv("QREASON_QUANT_PYTHON", str(tmp_path / "mine" / "python"))
    assert QUANT.candidates() == [tmp_path / "mine" / "python"]  # the only choice: no silent fallback
    monkeypatch.setattr(launch, "IS_CHECKOUT", True)
    assert TRAIN.candidates()[0] == launch.PACKAGE_ROOT / ".venv-train" / "bin" / "python"
    assert TRAIN.default_dir == launch.PACKAGE_ROOT / ".venv-train"
    assert launch.setup_command("train") == "make env"


def test_the_link_makes_a_side_environment_import_this_qreason(tmp_path):
    python = bare_venv(tmp_path / "side")
    link = envs.link_qreason(python)
    assert link.is_symlink() and envs.link_qreason(python) == link  # a second setup leaves it as it is
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "qreason").mkdir(parents=True)  # a qreason/ in the working directory must not win
    (elsewhere / "qreason" / "__init__.py").write_text("raise SystemExit('the wrong qreason')\n")
    env = {k: v for k, v in launch.side_env_vars().items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(python), "-m", "qreason.workers.protocol"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "wrong qreason" not in out.stderr, out.stderr
    where = subprocess.run(
        [str(python), "-c", "import qreason, os; print(os.path.realpath(os.path.dirname(qreason.__file__)))"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where) == envs.QREASON_PACKAGE


def test_a_real_copy_of_qreason_in_the_environment_is_reported_not_overwritten(tmp_path):
    python = bare_venv(tmp_path / "side")
    copy = envs.purelib(python) / "qreason"
    copy.mkdir()
    (copy / "__init__.py").write_text("")
    with pytest.raises(UserError, match="uninstall it"):
        envs.link_qreason(python)
    assert (copy / "__init__.py").is_file()


def test_setup_rebuilds_only_what_changed(monkeypatch, installed):
    built = []

    def fake_build(env, env_dir, device, echo):  # stands in for uv: records what would be built
        bare_venv(env_dir)
        envs.link_qreason(env_dir / "bin" / "python")
        (env_dir / envs.STAMP).write_text(json.dumps(envs.wanted(env, device)))
        built.append(env.name)

    monkeypatch.setattr(envs, "build", fake_build)
    lines = []
    envs.setup(["quant"], device="cpu", echo=lines.append)
    envs.setup(["quant"], device="cpu", echo=lines.append)
    assert built == ["quant"] and "up to date" in lines[-1]
    envs.setup(["quant"], device="cuda", echo=lines.append)  # another torch: rebuilt
    stamp = installed / "quant" / envs.STAMP
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "requirements": "older"}))
    envs.setup(["quant"], device="cuda", echo=lines.append)  # other requirement files: rebuilt
    assert built == ["quant"] * 3
    with pytest.raises(UserError, match="no side environment 'quantize'"):
        envs.setup(["quantize"])
    with pytest.raises(UserError, match="exactly one"):
        envs.setup(["quant", "train"], path=installed / "x")


def test_doctor_names_what_is_missing_and_the_command_that_fixes_it(monkeypatch, capsys, tmp_path, installed):
    monkeypatch.setenv("QREASON_BENCH_PYTHON", str(bare_venv(tmp_path / "bare")))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert f"missing ({installed / 'quant'}); fix: qreason setup quant" in out
    assert "lm-eval, torch not installed; fix: qreason setup bench" in out
    assert out.strip().endswith("not ready: `qreason setup` makes every missing side environment")


def test_the_tested_vllm_range():
    assert envs.tested_vllm("0.32.0") and envs.tested_vllm("0.32.1+cpu")
    assert not envs.tested_vllm("0.26.0") and not envs.tested_vllm("0.33.0")


def test_the_wheel_ships_the_requirement_files_setup_reads():
    for env in launch.SIDE_ENVS:
        assert (envs.REQUIREMENTS / f"{env.name}.txt").is_file()
    assert "torch==" in (envs.REQUIREMENTS / "torch.txt").read_text()
    # the checkout's requirements/ names the same files (CI and make env read them there)
    repo = envs.QREASON_PACKAGE.parent
    if (repo / "requirements").is_dir():
        assert (repo / "requirements" / "quant.txt").resolve() == envs.REQUIREMENTS / "quant.txt"
    assert os.access(envs.REQUIREMENTS, os.R_OK)
