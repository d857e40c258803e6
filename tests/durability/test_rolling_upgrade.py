"""The rolling-upgrade playbook (``docs/ansible/rolling-upgrade.yml``) run by ``ansible-core``
over a local connection against two "boxes": two data directories, each with its own agent
process, configuration and health port, reading one simulated plant.

A box's "installed version" is a file naming which agent its ``edge-agent`` wrapper runs:
``old`` (this code), ``next`` (this code plus a schema migration, ``support/next_version.py``)
or ``broken`` (the next version that never becomes ready). The play's install, start and stop
commands are set to write that file and to start/stop the process, as the Debian package and
systemd would.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest
from _plant import Plant, write_config
from support import ROOT, free_port, wait_until
from test_upgrade_rollback import _fill

from agent.receiver import Receiver
from buffer import migrations
from buffer.snapshot import read_record

pytestmark = pytest.mark.slow

PLAYBOOK = ROOT / "docs" / "ansible" / "rolling-upgrade.yml"
ANSIBLE = Path(sys.executable).parent / "ansible-playbook"
CURRENT = migrations.SCHEMA_VERSION
PREFILLED = 300

WRAPPER = """#!/bin/sh
cd {root}
export PYTHONPATH={root}
case "$(cat {box}/installed)" in
  old) exec {python} -m agent.cli "$@" ;;
  next) exec {python} tests/support/next_version.py "$@" ;;
  broken) exec {python} tests/support/next_version.py --never-ready "$@" ;;
esac
echo "unknown version" >&2; exit 3
"""
START = ("setsid {box}/edge-agent run --config {box}/agent.yaml >> {box}/agent.log 2>&1 "
         "< /dev/null & echo $! > {box}/pid")
STOP = ("if [ -f {box}/pid ]; then pid=$(cat {box}/pid); kill $pid 2>/dev/null; "
        "while kill -0 $pid 2>/dev/null; do sleep 0.05; done; rm -f {box}/pid; fi")


def _box(root: Path, name: str, plant_port: int, rx_url: str) -> tuple[Path, int]:
    box = root / name
    box.mkdir()
    port = free_port()
    write_config(box / "agent.yaml", box / "data", plant_port, rx_url, health_port=port)
    (box / "installed").write_text("old\n")
    wrapper = box / "edge-agent"
    wrapper.write_text(WRAPPER.format(root=ROOT, box=box, python=sys.executable))
    wrapper.chmod(0o755)
    _fill(box / "data" / "buffer.db", PREFILLED, start=10_000 * int(name[-1]))  # distinct ids
    return box, port


def _inventory(path: Path, boxes: dict[str, tuple[Path, int]]) -> Path:
    """A YAML inventory (written as JSON, which YAML reads) with each box's commands."""
    hosts = {name: {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "edge_agent_bin": f"{box}/edge-agent", "edge_agent_config": f"{box}/agent.yaml",
        "edge_agent_readyz": f"http://127.0.0.1:{port}/readyz",
        "edge_agent_installed_version": f"cat {box}/installed",
        "edge_agent_install": f"echo {{{{ version }}}} > {box}/installed && "
                              f"echo {{{{ version }}}} >> {box}/history",
        "edge_agent_start": START.format(box=box), "edge_agent_stop": STOP.format(box=box),
    } for name, (box, port) in boxes.items()}
    path.write_text(json.dumps({"edge_agents": {"hosts": hosts}}, indent=2))
    return path


async def _shell(cmd: str) -> None:
    proc = await asyncio.create_subprocess_shell(cmd)
    assert await proc.wait() == 0, cmd


async def _play(tmp: Path, inventory: Path, version: str) -> tuple[int, str]:
    env = {**os.environ, "LC_ALL": "C.UTF-8", "ANSIBLE_HOME": str(tmp / "ansible"),
           "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible" / "tmp"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_HOST_KEY_CHECKING": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0"}
    proc = await asyncio.create_subprocess_exec(
        str(ANSIBLE), "-i", str(inventory), str(PLAYBOOK), "-e",
        f"edge_agent_version={version}", "-e", "edge_agent_ready_timeout=8", "-e",
        "edge_agent_ready_delay=1", cwd=tmp, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    return int(proc.returncode or 0), out.decode(errors="replace")


def _schema(box: Path) -> int:
    with closing(sqlite3.connect(box / "data" / "buffer.db")) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


async def _scenario(tmp: Path, version: str) -> tuple[int, str, dict[str, Path], Receiver]:
    plant = Plant()
    await plant.start()
    rx = Receiver(tmp / "rx.db")
    await rx.start()
    boxes = {n: _box(tmp, n, plant.port, rx.url) for n in ("box1", "box2")}
    inventory = _inventory(tmp / "inventory.yml", boxes)
    try:
        for box, _ in boxes.values():
            await _shell(START.format(box=box))
        code, out = await _play(tmp, inventory, version)
        def delivered() -> int:
            return len({e["id"] for e in rx.events() if str(e["id"]).startswith("up-")})

        await wait_until(lambda: delivered() == PREFILLED * 2, timeout=30,
                         what="every prefilled event of both boxes delivered")
    finally:
        for box, _ in boxes.values():
            await _shell(STOP.format(box=box))
        await plant.stop()
    return code, out, {n: b for n, (b, _) in boxes.items()}, rx


async def test_a_good_release_rolls_out_one_box_after_the_other(tmp_path: Path) -> None:
    code, out, boxes, rx = await _scenario(tmp_path, "next")
    await rx.aclose()
    assert code == 0, out[-4000:]
    for box in boxes.values():
        assert (box / "installed").read_text().strip() == "next"
        assert _schema(box) == CURRENT + 1
        rec = read_record(box / "data" / "buffer.db")
        assert rec is not None and rec["outcome"] == "migrated"
    # One box at a time: box1's play ends (ready) before box2's begins.
    assert out.index("box1") < out.index("box2")
    assert out.rindex("[box1]") < out.index("[box2]"), out[-4000:]


async def test_a_release_that_never_gets_ready_is_rolled_back_and_stops_the_rollout(
        tmp_path: Path) -> None:
    code, out, boxes, rx = await _scenario(tmp_path, "broken")
    await rx.aclose()
    assert code != 0
    assert "did not become ready" in out and "rolled back to old" in out, out[-4000:]
    box1, box2 = boxes["box1"], boxes["box2"]
    assert (box1 / "history").read_text().split() == ["broken", "old"]
    assert (box1 / "installed").read_text().strip() == "old" and _schema(box1) == CURRENT
    rec = read_record(box1 / "data" / "buffer.db")
    assert rec is not None and rec["outcome"] == "rolled back"
    assert not (box2 / "history").exists() and _schema(box2) == CURRENT  # never touched
    back = out.split("TASK [Wait until the previous version is ready]")[1].split("TASK [")[0]
    assert "ok: [box1]" in back, out[-4000:]  # the old version was ready again
