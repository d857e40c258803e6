"""/healthz notices a stalled event loop from outside it: while the loop is blocked, a
watchdog thread answers 503 on the same socket; afterwards the loop answers 200 again."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
from support import wait_until

from agent.health import HealthServer
from agent.runtime import Runtime
from agent.wiring.load import load_config_text


async def test_a_blocked_loop_gets_503_not_a_timeout(tmp_path: Path) -> None:
    config = load_config_text(f"""
agent: {{id: stall-edge, site: s1, data_dir: "{tmp_path}", stop_timeout: 1s}}
health: {{listen: "127.0.0.1:0"}}
""", "<test>")
    rt = Runtime(config)
    health = HealthServer(rt, config.health.listen, stall_after=0.5)
    await rt.start()
    port = await health.start()
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.get(url + "/healthz")).status_code == 200
            seen: list[tuple[int, dict[str, object]]] = []
            unblock = threading.Event()

            def probe() -> None:
                # From another thread, as a liveness probe would: poll until the 503 comes.
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not seen:
                    try:
                        r = httpx.get(url + "/healthz", timeout=1)
                    except httpx.HTTPError:
                        continue
                    if r.status_code == 503:
                        seen.append((r.status_code, r.json()))
                        seen.append((httpx.get(url + "/status", timeout=1).status_code, {}))
                        r = httpx.post(url + "/machines/m1/episodes/e1/reason",
                                       json={"code": "7"}, timeout=1)
                        seen.append((r.status_code, r.json()))
                unblock.set()

            thread = threading.Thread(target=probe)
            thread.start()
            # The scenario itself: this blocks the event loop (no await) until the probe has
            # its answer, as a CPU-bound bug or a blocking call would.
            unblock.wait(10)
            thread.join()
            assert seen and seen[0][0] == 503 and seen[0][1]["status"] == "stalled"
            assert float(seen[0][1]["tick_age_s"]) >= 0.5  # type: ignore[arg-type]
            assert seen[1][0] == 503  # every path: the loop cannot serve /status either
            # A reason entered meanwhile: "try again" (503), not "wrong method" (405).
            assert seen[2][0] == 503 and "stalled" in str(seen[2][1]["error"])
            assert sum(g.answered for g in health.guards) >= 3

            async def healthy() -> bool:
                return (await http.get(url + "/healthz")).status_code == 200

            await wait_until(healthy, what="the loop answers again")
            assert (await http.get(url + "/status")).status_code == 200
    finally:
        await health.aclose()
        await rt.stop()
