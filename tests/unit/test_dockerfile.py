"""The Dockerfile without a Docker engine: its shape is checked statically, and the build
stage's own COPY and RUN instructions are executed in a fresh venv in a temporary directory
(paths inside the image mapped to it), then the runtime stage's smoke command."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent import __version__
from agent.wiring.schema import HealthConfig

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, rest in instructions():
        if word == "FROM":
            m = re.search(r"\bAS\s+(\S+)$", rest, re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            current = result.setdefault(m.group(1), [])
        elif current is not None:
            current.append((word, rest))
    return result


def test_multi_stage_slim_non_root_with_volume_healthcheck_and_exec_entrypoint() -> None:
    st = stages()
    assert list(st) == ["build", "runtime"]
    assert any(w == "ARG" and "slim" in r for w, r in instructions())
    runtime = st["runtime"]
    words = [w for w, _ in runtime]
    assert "COPY" in words and all("--from=build" in r for w, r in runtime if w == "COPY")
    user = next(r for w, r in runtime if w == "USER")
    assert user.split(":")[0] not in ("root", "0")
    volume = json.loads(next(r for w, r in runtime if w == "VOLUME"))
    assert "/var/lib/edge-agent" in volume
    assert HealthConfig().listen.endswith(":9780")
    health = next(r for w, r in runtime if w == "HEALTHCHECK")
    assert "CMD [" in health and "127.0.0.1:9780/healthz" in health
    entry = json.loads(next(r for w, r in runtime if w == "ENTRYPOINT"))
    assert entry == ["edge-agent"]  # exec form: the agent is PID 1 and gets SIGTERM itself
    assert json.loads(next(r for w, r in runtime if w == "CMD"))[0] == "run"
    assert ("RUN", '["edge-agent", "--version"]') in runtime
    # The venv from the build stage is where the runtime's PATH points.
    assert any(w == "ENV" and "/opt/edge-agent/bin" in r for w, r in runtime)


def test_build_stage_copies_every_package_and_dockerignore_keeps_the_context_small() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top = {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    copied = {src for w, r in stages()["build"] if w == "COPY" for src in r.split()[:-1]}
    assert top <= copied, f"packages not copied into the build stage: {top - copied}"
    assert {"pyproject.toml", "README.md"} <= copied
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "tests", "*.db"} <= ignored
    assert not top & ignored


def _map(text: str, paths: dict[str, Path]) -> str:
    for inside, outside in paths.items():
        text = text.replace(inside, str(outside))
    return text


@pytest.mark.slow
def test_build_stage_commands_work_in_a_fresh_venv(tmp_path: Path) -> None:
    """Run the build stage's COPY/RUN lines for real; then the runtime stage's smoke step."""
    paths = {"/opt/edge-agent": tmp_path / "opt-edge-agent", "/wheels": tmp_path / "wheels",
             "/src": tmp_path / "src"}
    # `python` in the image is the base interpreter, not our test venv's.
    base = Path(getattr(sys, "_base_executable", sys.executable))
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").symlink_to(base)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{shim}:{env.get('PATH', '/usr/bin:/bin')}"
    for word, rest in stages()["build"]:
        if word == "WORKDIR":
            Path(_map(rest, paths)).mkdir(parents=True, exist_ok=True)
        elif word == "ENV":
            for pair in rest.split():
                key, _, value = pair.partition("=")
                env[key] = value
        elif word == "COPY":
            *sources, dest = rest.split()
            target = Path(_map(dest, paths))
            for src in sources:
                if dest.endswith("/"):  # files into a directory
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / src, target / src)
                else:
                    shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns(
                        "__pycache__", "*.pyc"))
        elif word == "RUN":
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", _map(rest, paths)],
                                  cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, f"RUN {rest}\n{done.stdout[-2000:]}\n" \
                                         f"{done.stderr[-4000:]}"
    # Runtime stage: PATH as its ENV sets it, the smoke RUN, from a directory without sources.
    env["PATH"] = f"{paths['/opt/edge-agent']}/bin:{env['PATH']}"
    done = subprocess.run(["edge-agent", "--version"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"edge-agent {__version__}"
    # The installed agent is the wheel's, not this checkout's.
    where = subprocess.run([str(paths["/opt/edge-agent"] / "bin" / "python"), "-c",
                            "import agent.health, agent.notify; print(agent.health.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(paths["/opt/edge-agent"]))


def test_the_wheel_lists_every_package_of_the_tree() -> None:
    """The wheel (the image's and the Debian package's venv) has only the packages listed in
    pyproject.toml: a package split out later and not listed there is missing from both (the
    receiver package was: ``edge-agent demo`` and ``receiver`` failed in the image, while
    ``--version`` and ``config schema`` still worked)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    top = {p.split(".")[0] for p in listed}
    on_disk = {".".join(d.relative_to(ROOT).parts) for t in top
               for d in [ROOT / t, *(ROOT / t).rglob("*")]
               if d.is_dir() and (d / "__init__.py").exists()}
    assert on_disk - listed == set(), "packages missing from [tool.setuptools] packages"
    assert listed - on_disk == set(), "listed packages that do not exist"
