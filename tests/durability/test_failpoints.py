"""kill -9 at each critical point of the delivery path, deterministically, then a restart.

Each scenario runs the agent as a subprocess armed with ``EDGE_AGENT_FAILPOINT`` (see
``agent/failpoints.py``) while the simulated plant makes events; the agent SIGKILLs itself at
the named point; the test checks it died by SIGKILL, restarts it unarmed, lets everything drain
and counts at the receiver (``_plant.check_exact``: N detected, N distinct delivered in order,
scrap adds up exactly).

"After the POST is sent, before the answer" is done from the receiver's side: its request
handler SIGKILLs the agent when the POST arrives, then stores the events and answers into a
closed socket. The receiver therefore has events the agent never saw acknowledged.

Duplicate deliveries: the two delivery-side points must cause at least one re-send, answered
409 by the receiver's dedup (``duplicates`` >= 1) and stored once. The two commit-side points
cause none by themselves, but a POST in flight at the moment of the kill may be re-sent too, so
for them only the stored count is exact.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from _plant import Plant, check_exact, drained_status, get_json, write_config
from support import AgentProcess, free_port, wait_until

from agent.httpserver import Request, Response
from agent.receiver import Receiver
from buffer.sqlite import SqliteBuffer
from config.failpoints import ENV

pytestmark = pytest.mark.slow


class KillOnPost(Receiver):
    """SIGKILLs the agent when the ``kill_on``-th POST arrives, then handles it normally."""

    agent: AgentProcess | None = None
    kill_on = 0
    posts = 0

    async def _post(self, request: Request) -> tuple[Response, list[str]]:
        self.posts += 1
        if self.posts == self.kill_on and self.agent is not None and self.agent.proc:
            self.agent.proc.send_signal(signal.SIGKILL)
            self.agent.proc.wait(5)
        return await super()._post(request)


def _baseline_committed(db: Path) -> bool:
    """The agent's first reading of both machines is durable (its scrap baseline)."""
    if not db.exists():
        return False
    try:
        buf = SqliteBuffer.attach(db)
    except Exception:
        return False
    try:
        states = buf.load_states()
    except Exception:
        return False
    finally:
        buf.close()
    return {"m1", "m2"} <= states.keys()


async def _scenario(tmp_path: Path, failpoint: str | None, receiver: Receiver) -> Receiver:
    plant = Plant()
    await plant.start()
    await receiver.start()
    health = free_port()
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "agent.yaml", data, plant.port, receiver.url, health)
    log = tmp_path / "agent.log"
    armed = AgentProcess(cfg, log, env={ENV: failpoint or ""})
    if isinstance(receiver, KillOnPost):
        receiver.agent = armed
    stop = asyncio.Event()
    driver: asyncio.Task[None] | None = None
    again = AgentProcess(cfg, log, env={ENV: ""})
    try:
        armed.start()
        await wait_until(lambda: _baseline_committed(data / "buffer.db")
                         or not armed.alive, timeout=20, what="first reading committed")
        assert armed.alive, f"agent died before its first commit; see {log}"
        driver = asyncio.create_task(plant.drive(stop))
        await wait_until(lambda: not armed.alive, timeout=30, what=f"failpoint {failpoint}")
        assert armed.proc is not None and armed.proc.returncode == -signal.SIGKILL, \
            f"expected death by SIGKILL, got {armed.proc.returncode if armed.proc else None}"

        again.start()
        before = receiver.stats()["received"]
        await wait_until(lambda: receiver.stats()["received"] > before + 3, timeout=20,
                         what="progress after the restart")
        stop.set()
        await driver
        await plant.calm()
        url = f"http://127.0.0.1:{health}/status"

        async def drained() -> bool:
            return drained_status(await get_json(url), plant, receiver)

        await wait_until(drained, timeout=30, interval=0.1, what="everything drained")
        assert again.terminate() == 0
        counts = check_exact(receiver, plant)
        assert sum(counts.values()) > 5, counts
    finally:
        stop.set()
        if driver is not None:
            await driver
        armed.kill()
        again.kill()
        await plant.stop()
    return receiver


@pytest.mark.parametrize("point", ["before_commit:60", "after_commit:60"])
async def test_kill_at_commit_points(tmp_path: Path, point: str) -> None:
    receiver = await _scenario(tmp_path, point, Receiver(tmp_path / "rx.db"))
    await receiver.aclose()


async def test_kill_after_2xx_before_settle_resends_and_dedup_absorbs_it(
        tmp_path: Path) -> None:
    receiver = await _scenario(tmp_path, "after_2xx_before_settle:4",
                               Receiver(tmp_path / "rx.db"))
    # The killed batch was stored but not settled: re-sent after the restart, answered 409.
    assert receiver.stats()["duplicates"] >= 1
    await receiver.aclose()


async def test_kill_after_post_sent_before_answer(tmp_path: Path) -> None:
    receiver = KillOnPost(tmp_path / "rx.db")
    receiver.kill_on = 4
    await _scenario(tmp_path, None, receiver)
    assert receiver.stats()["duplicates"] >= 1
    await receiver.aclose()


def test_failpoint_spec_is_checked() -> None:
    from config.failpoints import _parse

    assert _parse(None) == (None, 0) and _parse("") == (None, 0)
    assert _parse("after_commit") == ("after_commit", 1)
    assert _parse("before_commit:7") == ("before_commit", 7)
    with pytest.raises(ValueError, match="unknown failpoint 'befor_commit'"):
        _parse("befor_commit")
    with pytest.raises(ValueError, match="positive integer"):
        _parse("after_commit:0")
