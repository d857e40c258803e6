"""The container image built and run for real (``make image-test``, called by ``.ci/run``).

Engine: the one ``DOCKER_HOST`` (or the default socket) answers; else a private ``dockerd``
started here (its own data root and socket, no bridge, no iptables rules), stopped at the end.
Base: ``python:3.11-slim-bookworm`` when a registry answers; else a bookworm root made with
debootstrap (``packaging/bookworm-root.sh``) and imported, trusting this machine's CA bundle
(its network intercepts TLS, and the build stage installs from PyPI through it).

Networking: containers run with ``--network none``, or join the receiver container's network
namespace (``--network container:rx``): everything talks over a loopback of their own.

Checks: the image's size (at most 200 MB), a non-root uid, HEALTHCHECK healthy with a real
configuration, ``demo`` inside, SIGTERM drains within the stop timeout (exit 0, not a kill),
and an upgrade from the image of the previous commit (``EDGE_AGENT_PREVIOUS_REF``, default
``HEAD~1``) to this one on the same volume delivers every event the old one left pending.
Skips with the reason when no engine can be had.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT

pytestmark = pytest.mark.deploy

IMAGE, PREVIOUS, RX = "edge-agent:image-test", "edge-agent:image-test-previous", "ea-rx"
OFFICIAL = "python:3.11-slim-bookworm"
MAX_BYTES = 200 * 10**6
PENDING = 2000
BASE_PACKAGES = "python3.11,python3.11-venv,python3-distutils,python-is-python3,ca-certificates"

CONFIG = """\
agent: {id: img-edge, site: s1, data_dir: /var/lib/edge-agent, stop_timeout: 20s}
sources:
  plc: {type: modbus, host: 127.0.0.1, port: 5020, poll_interval: 1s,
        tags: {m.state: {table: holding, address: 0, type: uint16}}}
machines:
  m1: {line: l1, state: {tag: m.state, map: {1: running, 3: down}}}
sinks:
  central: {type: http, url: "http://127.0.0.1:8080/events", mode: batch,
            batch_max_events: 200}
"""

# Run by the *previous* image's Python: its own buffer code writes the pending events.
FILL = """
import json
from buffer.base import NewEvent
from buffer.sqlite import SqliteBuffer
b = SqliteBuffer("/var/lib/edge-agent/buffer.db", max_size=2**30)
b.open(["central"])
def ev(i):
    d = {"specversion": "1.0", "id": f"img-{i:06d}", "source": "/sites/s1/lines/l1/machines/m1",
         "type": "plantedge.scrap.recorded", "time": "2026-01-01T00:00:00.000Z",
         "datacontenttype": "application/json", "agentid": "img-edge", "sequence": str(i + 1),
         "data": {"machine": "m1", "line": "l1", "site": "s1", "order_id": None,
                  "quantity": 1, "window_start": "2026-01-01T00:00:00.000Z",
                  "window_end": "2026-01-01T00:01:00.000Z", "reason_code": None}}
    return NewEvent(d["id"], "m1", d["type"], d["time"], json.dumps(d))
b.append([ev(i) for i in range(N)], {})
b.close()
""".replace("range(N)", f"range({PENDING})")


class Docker:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, *args: str, timeout: float = 600, check: bool = True,
                 stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["docker", *args], env=self.env, input=stdin,
                              capture_output=True, timeout=timeout, check=False)
        out = subprocess.CompletedProcess(done.args, done.returncode,
                                          done.stdout.decode(errors="replace"),
                                          done.stderr.decode(errors="replace"))
        if check and out.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:3])}... failed ({out.returncode}):\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out


def _answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["docker", "info"], env=env, capture_output=True,
                              timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    if shutil.which("docker") is None:
        pytest.skip("no docker client (apt-get install docker.io)")
    env = dict(os.environ)
    if _answers(env):
        yield Docker(env)
        return
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        pytest.skip("no Docker engine answers, and none can be started here (needs root and "
                    "dockerd: apt-get install docker.io)")
    work = Path(tempfile.mkdtemp(prefix="ea-docker-"))
    sock = work / "docker.sock"
    env["DOCKER_HOST"] = f"unix://{sock}"
    log = (work / "dockerd.log").open("wb")
    proc = None
    for driver in ("overlay2", "vfs"):
        proc = subprocess.Popen(
            ["dockerd", "--data-root", str(work / "root"), "--exec-root", str(work / "exec"),
             "--host", env["DOCKER_HOST"], "--pidfile", str(work / "pid"), "--bridge=none",
             "--iptables=false", "--ip-masq=false", f"--storage-driver={driver}"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and proc.poll() is None and not _answers(env):
            time.sleep(0.5)
        if proc.poll() is None and _answers(env):
            break
        proc.terminate()
        proc.wait(30)
        proc = None
    if proc is None:
        tail = (work / "dockerd.log").read_text(errors="replace")[-1500:]
        pytest.skip(f"a Docker engine cannot be started here; dockerd said:\n{tail}")
    try:
        yield Docker(env)
    finally:
        proc.terminate()
        proc.wait(60)
        # dockerd leaves its network namespace (and any stale layer) mounted under its roots.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(work))]
        for mount in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(work, ignore_errors=True)


def _base(docker: Docker, work: Path) -> str:
    if docker("pull", OFFICIAL, check=False, timeout=120).returncode == 0:
        return OFFICIAL
    root = work / "bookworm"
    done = subprocess.run(["bash", "packaging/bookworm-root.sh", str(root), BASE_PACKAGES],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt")
    (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    tar = subprocess.run(["tar", "-C", str(root), "-c", "."], capture_output=True, check=True)
    docker("import", "-", "edge-agent-base:bookworm", stdin=tar.stdout)
    shutil.rmtree(root, ignore_errors=True)
    return "edge-agent-base:bookworm"


def _build(docker: Docker, context: Path, base: str, tag: str) -> None:
    docker("build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}", "-t", tag,
           str(context), timeout=900)


@pytest.fixture(scope="module")
def images(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """{"current": tag, "previous": tag or the reason there is none, "base": base}."""
    work = tmp_path_factory.mktemp("image")
    t0 = time.monotonic()
    base = _base(docker, work)
    t1 = time.monotonic()
    _build(docker, ROOT, base, IMAGE)
    t2 = time.monotonic()
    ref = os.environ.get("EDGE_AGENT_PREVIOUS_REF", "HEAD~1")
    previous = f"no previous build: {ref} cannot be read from git here"
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT,
                             capture_output=True, check=False)
    if archive.returncode == 0:
        src = work / "previous"
        src.mkdir()
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
        _build(docker, src, base, PREVIOUS)
        previous = PREVIOUS
    print(f"\nimage: base {base} in {t1 - t0:.0f}s, build {t2 - t1:.0f}s, previous "
          f"({ref}) {time.monotonic() - t2:.0f}s")
    yield {"current": IMAGE, "previous": previous, "base": base}
    docker("rm", "-f", RX, check=False)


@pytest.fixture
def receiver(docker: Docker, images: dict[str, str]) -> Iterator[str]:
    """The reference receiver in its own container; others join its network namespace."""
    docker("rm", "-f", RX, check=False)
    docker("run", "-d", "--name", RX, "--network", "none", IMAGE, "receiver", "--listen",
           "127.0.0.1:8080", "--db", "/var/lib/edge-agent/rx.db")
    _poll(lambda: _rx_count(docker) is not None, 30, "receiver up")
    yield RX
    docker("rm", "-f", RX, check=False)


def _rx_count(docker: Docker) -> int | None:
    done = docker("exec", RX, "python", "-c", "import sqlite3; print(sqlite3.connect("
                  "'/var/lib/edge-agent/rx.db').execute(\"SELECT count(*) FROM received WHERE "
                  "id LIKE 'img-%'\").fetchone()[0])", check=False)
    return int(done.stdout) if done.returncode == 0 and done.stdout.strip().isdigit() else None


def _poll(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    path.chmod(0o644)
    return path


def _agent(docker: Docker, image: str, name: str, volume: str, config: Path,
           *extra: str) -> None:
    docker("rm", "-f", name, check=False)
    docker("run", "-d", "--name", name, "--network", f"container:{RX}", "--stop-timeout", "30",
           "-v", f"{volume}:/var/lib/edge-agent", "-v",
           f"{config}:/etc/edge-agent/config.yaml:ro", *extra, image)


def _volume(docker: Docker, name: str) -> str:
    docker("volume", "rm", "-f", name, check=False)
    docker("volume", "create", name)
    return name


# --------------------------------------------------------------------------- the checks


def test_the_image_is_at_most_200_mb_and_runs_as_a_non_root_user(
        docker: Docker, images: dict[str, str]) -> None:
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    layers = docker("history", "--format", "{{.Size}}\t{{.CreatedBy}}", IMAGE).stdout
    print(f"\nimage {size / 1e6:.0f} MB on {images['base']}; layers:\n{layers[:1500]}")
    assert size <= MAX_BYTES, f"{size / 1e6:.0f} MB"
    uid = docker("run", "--rm", "--network", "none", "--entrypoint", "id", IMAGE, "-u").stdout
    assert uid.strip() == "10001"


def test_demo_runs_inside(docker: Docker, images: dict[str, str]) -> None:
    done = docker("run", "--rm", "--network", "none", IMAGE, "demo", "--duration", "8",
                  timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "delivered=" in done.stdout and "pending=0" in done.stdout, done.stdout[-1500:]


def test_healthy_with_a_real_config_and_sigterm_drains_in_the_stop_timeout(
        docker: Docker, receiver: str, config: Path) -> None:
    vol = _volume(docker, "ea-health")
    docker("run", "--rm", "-v", f"{vol}:/var/lib/edge-agent", "--entrypoint", "python", IMAGE,
           "-c", FILL)
    _agent(docker, IMAGE, "ea-agent", vol, config, "--health-interval", "1s",
           "--health-start-period", "2s")
    try:
        _poll(lambda: docker("inspect", "-f", "{{.State.Health.Status}}", "ea-agent")
              .stdout.strip() == "healthy", 90, "HEALTHCHECK healthy")
        t0 = time.monotonic()
        docker("stop", "-t", "30", "ea-agent", timeout=60)
        took = time.monotonic() - t0
        state = json.loads(docker("inspect", "-f", "{{json .State}}", "ea-agent").stdout)
        logs = docker("logs", "ea-agent").stderr + docker("logs", "ea-agent").stdout
    finally:
        docker("rm", "-f", "ea-agent", check=False)
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, logs[-2000:])
    assert took < 30, took  # drained and exited by itself, before the engine's SIGKILL
    assert "draining" in logs, logs[-2000:]
    assert _rx_count(docker) == PENDING  # every pending event delivered, none lost
    docker("volume", "rm", "-f", vol, check=False)


def test_an_upgrade_from_the_previous_image_on_the_same_volume_keeps_every_pending_event(
        docker: Docker, images: dict[str, str], receiver: str, config: Path) -> None:
    if not images["previous"].startswith("edge-agent:"):
        pytest.skip(images["previous"])
    vol = _volume(docker, "ea-upgrade")
    # The previous version writes PENDING events into its buffer; its sink is unreachable
    # (no receiver on 8081), so they stay pending while it runs and stops.
    docker("run", "--rm", "-v", f"{vol}:/var/lib/edge-agent", "--entrypoint", "python",
           PREVIOUS, "-c", FILL)
    offline = config.with_name("offline.yaml")
    offline.write_text(CONFIG.replace("127.0.0.1:8080", "127.0.0.1:8081"))
    offline.chmod(0o644)
    _agent(docker, PREVIOUS, "ea-old", vol, offline)
    time.sleep(3)  # the old version runs for a while (the scenario, not a synchronisation)
    docker("stop", "-t", "30", "ea-old", timeout=60)
    docker("rm", "-f", "ea-old", check=False)
    assert _rx_count(docker) == 0
    # This version on the same volume: every pending event arrives.
    _agent(docker, IMAGE, "ea-new", vol, config)
    try:
        _poll(lambda: _rx_count(docker) == PENDING, 90, "every pending event after the upgrade")
        docker("stop", "-t", "30", "ea-new", timeout=60)
        code = json.loads(docker("inspect", "-f", "{{json .State}}", "ea-new").stdout)
    finally:
        with contextlib.suppress(AssertionError):
            docker("rm", "-f", "ea-new", check=False)
    assert code["ExitCode"] == 0
    docker("volume", "rm", "-f", vol, check=False)
