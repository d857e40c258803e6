"""``edge-agent browse``, ``edge-agent probe`` and ``edge-agent opcua gen-cert`` against a real
asyncua server (the CLI runs in a worker thread with its own event loop)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509
from support import free_port

from agent.cli import main
from protocols.opcua.security import certificate_uri, fingerprint
from protocols.opcua.testserver import OpcuaTestServer

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[OpcuaTestServer]:
    srv = OpcuaTestServer({"Cell.State": 3, "Cell.Speed": 12.5, "Cell.Order": "PO-9"})
    await srv.start()
    yield srv
    await srv.stop()


async def run_cli(*args: str) -> int:
    return await asyncio.to_thread(main, list(args))


async def test_browse_lists_names_types_and_nsu_node_ids(
        server: OpcuaTestServer, capsys: pytest.CaptureFixture[str]) -> None:
    code = await run_cli("browse", "--endpoint", server.endpoint, "--node",
                         f"nsu={server.namespace};s=Plant", "--depth", "1")
    out = capsys.readouterr().out
    assert code == 0, out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert set(lines) == {"Cell.State", "Cell.Speed", "Cell.Order"}
    assert "Int32" in lines["Cell.State"] and "Double" in lines["Cell.Speed"]
    assert "String" in lines["Cell.Order"]
    assert lines["Cell.State"].rstrip().endswith(f"nsu={server.namespace};s=Cell.State")


async def test_browse_unreachable_endpoint_fails_cleanly(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = await run_cli("browse", "--endpoint", f"opc.tcp://127.0.0.1:{free_port()}")
    assert code == 1
    assert "edge-agent:" in capsys.readouterr().err


async def test_probe_prints_a_table_and_flags_unreachable_sources(
        server: OpcuaTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"""
agent: {{id: t, site: s, data_dir: "{tmp_path}"}}
sources:
  cell:
    type: opcua
    endpoint: {server.endpoint}
    timeout: 2s
    tags:
      cell.state: {{node: "{server.node('Cell.State')}"}}
      cell.speed: {{node: "{server.node('Cell.Speed')}"}}
      cell.ghost: {{node: "{server.node('Cell.Ghost')}"}}
  gone:
    type: opcua
    endpoint: opc.tcp://127.0.0.1:{free_port()}
    timeout: 1s
    tags:
      gone.x: {{node: "ns=2;s=X"}}
""")
    code = await run_cli("probe", "--config", str(cfg), "cell")
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert rows["TAG"][:5] == ["TAG", "VALUE", "TYPE", "QUALITY", "TIMESTAMP"]
    assert rows["cell.state"][1:4] == ["3", "int", "good"]
    assert rows["cell.speed"][1:4] == ["12.5", "float", "good"]
    assert rows["cell.ghost"][1:4] == ["-", "-", "bad"] and "BadNodeIdUnknown" in out
    code = await run_cli("probe", "--config", str(cfg))
    out = capsys.readouterr().out
    assert code == 1
    assert "source gone: UNREACHABLE" in out and "source cell: 3 tag(s)" in out
    assert await run_cli("probe", "--config", str(cfg), "nope") == 2


async def test_gen_cert_writes_a_certificate_with_the_application_uri(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = tmp_path / "pki"
    code = await run_cli("opcua", "gen-cert", "--dir", str(pki), "--application-uri",
                         "urn:edge-01:plant-edge-agent", "--hostname", "edge-01")
    out = capsys.readouterr().out
    assert code == 0
    cert = x509.load_der_x509_certificate((pki / "edge-agent.der").read_bytes())
    assert certificate_uri(cert) == "urn:edge-01:plant-edge-agent"
    assert fingerprint(cert) in out and "trust" in out and (pki / "trusted").is_dir()
    assert (pki / "edge-agent.pem").stat().st_mode & 0o077 == 0
    # A second run must not silently replace a certificate servers already trust.
    assert await run_cli("opcua", "gen-cert", "--dir", str(pki)) == 1
    assert "already exist" in capsys.readouterr().err
