"""OPC UA security against a real asyncua server that offers only Basic256Sha256 and
Aes256_Sha256_RsaPss and requires a user name: generated certificates, a pinned server
certificate, refusal messages."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from config.errors import ConnectionLostError, FatalError
from config.model import Quality
from protocols.opcua.config import OpcuaSourceConfig
from protocols.opcua.security import UntrustedServerError, generate_certificate
from protocols.opcua.source import OpcuaSource
from protocols.opcua.testserver import OpcuaTestServer, ServerSecurity

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVER_URI = "urn:plant-edge-agent:test-server"
AGENT_URI = "urn:test-host:plant-edge-agent"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    server = generate_certificate(root / "server", SERVER_URI, hostnames=["127.0.0.1"],
                                  name="server", server=True)
    agent = generate_certificate(root / "agent", AGENT_URI, hostnames=["localhost"])
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copy(server.certificate, trusted / "server.der")
    (root / "empty").mkdir()
    return {"server_cert": server.certificate, "server_key": server.private_key,
            "cert": agent.certificate, "key": agent.private_key, "trusted": trusted,
            "empty": root / "empty", "server_fp": Path(server.fingerprint)}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(pki: dict[str, Path]) -> AsyncIterator[OpcuaTestServer]:
    srv = OpcuaTestServer({"Secure.Value": 42}, users={"edge": "s3cret"},
                          security=ServerSecurity(pki["server_cert"], pki["server_key"],
                                                  SERVER_URI,
                                                  ("Basic256Sha256", "Aes256_Sha256_RsaPss")))
    await srv.start()
    yield srv
    await srv.stop()


def cfg(srv: OpcuaTestServer, pki: dict[str, Path], *, policy: str = "Basic256Sha256",
        mode: str = "SignAndEncrypt", trust: str = "trusted", password: str | None = "s3cret",
        **extra: Any) -> OpcuaSourceConfig:
    security = {"policy": policy, "mode": mode, "certificate": str(pki["cert"]),
                "private_key": str(pki["key"]), "trust": str(pki[trust])}
    login = {"username": "edge", "password": password} if password is not None else {}
    return OpcuaSourceConfig.model_validate({
        "type": "opcua", "endpoint": srv.endpoint, "timeout": "2s", "security": security,
        "tags": {"v": {"node": srv.node("Secure.Value"), "type": "int"}}, **login, **extra})


@pytest.mark.parametrize("policy,mode", [("Basic256Sha256", "SignAndEncrypt"),
                                         ("Basic256Sha256", "Sign"),
                                         ("Aes256_Sha256_RsaPss", "SignAndEncrypt")])
async def test_secured_sessions_with_generated_certificates_read_values(
        server: OpcuaTestServer, pki: dict[str, Path], policy: str, mode: str) -> None:
    samples = await OpcuaSource("secure", cfg(server, pki, policy=policy, mode=mode)).probe()
    assert [(s.tag, s.value, s.quality) for s in samples] == [("v", 42, Quality.GOOD)]


async def test_untrusted_server_is_refused_with_its_fingerprint(
        server: OpcuaTestServer, pki: dict[str, Path]) -> None:
    with pytest.raises(UntrustedServerError) as err:
        await OpcuaSource("secure", cfg(server, pki, trust="empty")).probe()
    text = str(err.value)
    assert str(pki["server_fp"]) in text
    assert str(pki["empty"]) in text and "not trusted" in text
    assert SERVER_URI in text


async def test_wrong_password_is_a_clear_error(
        server: OpcuaTestServer, pki: dict[str, Path]) -> None:
    with pytest.raises(ConnectionLostError) as err:
        await OpcuaSource("secure", cfg(server, pki, password="wrong")).probe()
    assert "user 'edge'" in str(err.value) and "wrong user name or password" in str(err.value)
    assert "wrong" not in str(err.value).replace("wrong user name", "")  # no password echoed


async def test_anonymous_login_refused_when_the_server_wants_a_user(
        server: OpcuaTestServer, pki: dict[str, Path]) -> None:
    with pytest.raises(ConnectionLostError) as err:
        await OpcuaSource("secure", cfg(server, pki, password=None)).probe()
    assert "anonymous" in str(err.value)


async def test_a_policy_the_server_does_not_offer_is_never_downgraded(
        server: OpcuaTestServer, pki: dict[str, Path]) -> None:
    with pytest.raises(ConnectionLostError) as err:
        await OpcuaSource("secure", cfg(server, pki, policy="Aes128_Sha256_RsaOaep")).probe()
    text = str(err.value)
    assert "Aes128_Sha256_RsaOaep" in text and "Basic256Sha256/SignAndEncrypt" in text
    assert "never falls back" in text


async def test_no_security_block_against_a_secured_only_server_fails(
        server: OpcuaTestServer, pki: dict[str, Path]) -> None:
    plain = OpcuaSourceConfig.model_validate({
        "type": "opcua", "endpoint": server.endpoint, "timeout": "2s", "username": "edge",
        "password": "s3cret", "tags": {"v": {"node": server.node("Secure.Value")}}})
    with pytest.raises(ConnectionLostError):
        await OpcuaSource("plain", plain).probe()


async def test_missing_certificate_file_is_fatal(
        server: OpcuaTestServer, pki: dict[str, Path], tmp_path: Path) -> None:
    bad = cfg(server, pki)
    assert bad.security is not None
    broken = bad.model_copy(update={"security": bad.security.model_copy(
        update={"certificate": tmp_path / "nope.der"})})
    with pytest.raises(FatalError, match="cannot read the agent's certificate"):
        await OpcuaSource("secure", broken).probe()
