"""Secure sinks against real peers: the reference receiver behind TLS (server certificate from a
CA generated here, optionally requiring a client certificate) and an OAuth2 token endpoint
built on HttpServer that counts its requests."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import free_port

from agent.httpserver import HttpServer, Request, Response
from agent.receiver import Receiver
from agent.sinks.base import OutboundEvent, Outcome
from agent.sinks.config import HttpSinkConfig, OAuth2Config
from agent.sinks.http import HttpSink
from agent.sinks.oauth import OAuth2Token

SECRET = "client-s3cret-value-never-logged"

# ------------------------------------------------------------------ a small PKI


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


def _cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool,
          usage: list[x509.ObjectIdentifier] | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                            critical=False)
    else:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage(usage or []), critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    dir: Path
    ca: Path = field(init=False)
    server: Path = field(init=False)
    client: Path = field(init=False)
    rogue_client: Path = field(init=False)

    def __post_init__(self) -> None:
        def make_ca(stem: str) -> tuple[x509.Name, ec.EllipticCurvePrivateKey]:
            key = _key()
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{stem} CA")])
            _write(self.dir / stem, _cert(f"{stem} CA", key, name, key, ca=True), None)
            return name, key

        ca_name, ca_key = make_ca("plant-ca")
        rogue_name, rogue_key = make_ca("rogue-ca")
        for stem, usage, (iname, ikey) in [
                ("server", ExtendedKeyUsageOID.SERVER_AUTH, (ca_name, ca_key)),
                ("client", ExtendedKeyUsageOID.CLIENT_AUTH, (ca_name, ca_key)),
                ("rogue-client", ExtendedKeyUsageOID.CLIENT_AUTH, (rogue_name, rogue_key))]:
            key = _key()
            _write(self.dir / stem, _cert(stem, key, iname, ikey, ca=False, usage=[usage]), key)
        self.ca = self.dir / "plant-ca.crt"
        self.server = self.dir / "server"
        self.client = self.dir / "client"
        self.rogue_client = self.dir / "rogue-client"

    def server_context(self, require_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server.with_suffix(".crt"), self.server.with_suffix(".key"))
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.ca)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def tls_receiver(tmp_path: Path, ctx: ssl.SSLContext) -> Receiver:
    rx = Receiver(tmp_path / "rx.db", ssl_context=ctx)
    await rx.start()
    return rx


def event(n: int = 1) -> OutboundEvent:
    doc = {"specversion": "1.0", "id": f"ev-{n}", "source": "/sites/s/lines/l/machines/m",
           "type": "plantedge.downtime.started", "time": "2026-01-01T00:00:00Z",
           "datacontenttype": "application/json", "data": {"n": n}}
    return OutboundEvent(f"ev-{n}", doc["source"], json.dumps(doc))


def sink(url: str, **extra: Any) -> HttpSink:
    return HttpSink("erp", HttpSinkConfig.model_validate(
        {"type": "http", "url": url, "timeout": "3s", **extra}))


# ------------------------------------------------------------------ TLS


async def test_private_ca_verifies_the_receiver_and_static_headers_arrive(
        tmp_path: Path, pki: Pki) -> None:
    rx = await tls_receiver(tmp_path, pki.server_context())
    assert rx.url.startswith("https://")
    s = sink(rx.url, tls={"ca_file": str(pki.ca)}, headers={"X-Plant": "plant-a"})
    try:
        d = await s.deliver([event()])
        assert d.outcome is Outcome.ACCEPTED, d.detail
        assert rx.stats()["received"] == 1
        assert rx.requests[0].headers["x-plant"] == "plant-a"
    finally:
        await s.aclose()
        await rx.aclose()


async def test_verification_is_on_by_default_and_off_only_when_asked(
        tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    rx = await tls_receiver(tmp_path, pki.server_context())
    strict, lax = sink(rx.url), sink(rx.url, tls={"verify": False})
    try:
        d = await strict.deliver([event()])  # our CA is not in the system store
        assert d.outcome is Outcome.RETRY and "CERTIFICATE_VERIFY_FAILED" in d.detail
        assert rx.stats()["received"] == 0
        with caplog.at_level(logging.WARNING):
            assert (await lax.deliver([event()])).outcome is Outcome.ACCEPTED
        assert "verification is OFF" in caplog.text
    finally:
        await strict.aclose()
        await lax.aclose()
        await rx.aclose()


async def test_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    rx = await tls_receiver(tmp_path, pki.server_context(require_client_cert=True))
    ca = str(pki.ca)
    anonymous = sink(rx.url, tls={"ca_file": ca})
    rogue = sink(rx.url, tls={"ca_file": ca,
                              "client_cert": str(pki.rogue_client.with_suffix(".crt")),
                              "client_key": str(pki.rogue_client.with_suffix(".key"))})
    good = sink(rx.url, tls={"ca_file": ca, "client_cert": str(pki.client.with_suffix(".crt")),
                             "client_key": str(pki.client.with_suffix(".key"))})
    try:
        assert (await anonymous.deliver([event(1)])).outcome is Outcome.RETRY
        assert (await rogue.deliver([event(2)])).outcome is Outcome.RETRY
        assert rx.stats()["received"] == 0
        d = await good.deliver([event(3)])
        assert d.outcome is Outcome.ACCEPTED, d.detail
        assert [e["id"] for e in rx.events()] == ["ev-3"]
    finally:
        for s in (anonymous, rogue, good):
            await s.aclose()
        await rx.aclose()


async def test_unusable_tls_files_hold_the_sink_with_the_reason(tmp_path: Path,
                                                               pki: Pki) -> None:
    missing = tmp_path / "nope.crt"
    s1 = sink(f"https://127.0.0.1:{free_port()}/events", tls={"ca_file": str(missing)})
    # A key that does not belong to the certificate.
    s2 = sink(f"https://127.0.0.1:{free_port()}/events",
              tls={"client_cert": str(pki.client.with_suffix(".crt")),
                   "client_key": str(pki.server.with_suffix(".key"))})
    d1, d2 = await s1.deliver([event()]), await s2.deliver([event()])
    assert d1.outcome is Outcome.HOLD and str(missing) in d1.detail
    assert d2.outcome is Outcome.HOLD and "client certificate" in d2.detail
    # The file appears (a person fixed it): after the forwarder's reload the sink works.
    missing.write_bytes(pki.ca.read_bytes())
    rx = await tls_receiver(tmp_path, pki.server_context())
    s3 = sink(rx.url, tls={"ca_file": str(missing)})
    try:
        assert (await s3.deliver([event()])).outcome is Outcome.ACCEPTED
    finally:
        await s3.aclose()
        await rx.aclose()


# ------------------------------------------------------------------ OAuth2


class TokenEndpoint:
    """Client-credentials token endpoint; issues tok-1, tok-2, ... and tells the receiver."""

    def __init__(self, receiver: Receiver | None, expires_in: int | None = 3600) -> None:
        self.receiver = receiver
        self.expires_in = expires_in
        self.requests: list[dict[str, str]] = []
        self.auth_headers: list[str | None] = []
        self.refuse = False
        self.server = HttpServer(self._handle, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/oauth2/token"

    async def _handle(self, req: Request) -> Response:
        form = dict(parse_qsl(req.body.decode()))
        self.requests.append(form)
        self.auth_headers.append(req.headers.get("authorization"))
        if self.refuse:
            return Response.json({"error": "invalid_client"}, 401)
        basic = req.headers.get("authorization", "")
        creds = base64.b64decode(basic.removeprefix("Basic ")).decode() if basic else \
            f"{form.get('client_id')}:{form.get('client_secret')}"
        if form.get("grant_type") != "client_credentials" or creds != f"edge:{SECRET}":
            return Response.json({"error": "invalid_client"}, 401)
        token = f"tok-{len(self.requests)}"
        if self.receiver is not None:
            self.receiver.faults.require_token = token  # the API accepts only the newest
        doc: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not None:
            doc["expires_in"] = self.expires_in
        return Response.json(doc)


@pytest.fixture
async def rx(tmp_path: Path) -> AsyncIterator[Receiver]:
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    yield receiver
    await receiver.aclose()


@pytest.fixture
async def tokens(rx: Receiver) -> AsyncIterator[TokenEndpoint]:
    ep = TokenEndpoint(rx)
    await ep.server.start()
    yield ep
    await ep.server.aclose()


def oauth_sink(rx: Receiver, tokens: TokenEndpoint, **oauth: Any) -> HttpSink:
    return sink(rx.url, auth={"oauth2": {"token_url": tokens.url, "client_id": "edge",
                                         "client_secret": SECRET, **oauth}})


async def test_token_is_fetched_once_and_cached(rx: Receiver, tokens: TokenEndpoint) -> None:
    s = oauth_sink(rx, tokens, scope="events:write")
    try:
        for n in range(3):
            assert (await s.deliver([event(n)])).outcome is Outcome.ACCEPTED
    finally:
        await s.aclose()
    assert len(tokens.requests) == 1
    assert tokens.requests[0] == {"grant_type": "client_credentials", "scope": "events:write"}
    assert tokens.auth_headers[0] is not None and tokens.auth_headers[0].startswith("Basic ")
    assert {r.headers["authorization"] for r in rx.requests} == {"Bearer tok-1"}


async def test_token_expiry_is_honoured(rx: Receiver, tokens: TokenEndpoint) -> None:
    # expires_in 10 s with refresh_before 10 s: every token is due for refresh at once.
    tokens.expires_in = 10
    s = oauth_sink(rx, tokens, refresh_before="10s", client_auth="post")
    try:
        for n in range(3):
            assert (await s.deliver([event(n)])).outcome is Outcome.ACCEPTED
    finally:
        await s.aclose()
    assert len(tokens.requests) == 3
    assert tokens.requests[0]["client_id"] == "edge" and tokens.auth_headers[0] is None


def test_refresh_before_expiry_on_the_clock() -> None:
    now = [1000.0]
    tok = OAuth2Token(OAuth2Config.model_validate(
        {"token_url": "http://x/t", "client_id": "a", "client_secret": "b",
         "refresh_before": "30s"}), clock=lambda: now[0])
    tok._token, tok._valid_until = "tok-abc-123", None
    assert tok.cached  # no expires_in: kept until a 401
    tok._valid_until = now[0] + 300 - 30
    now[0] += 269
    assert tok.cached
    now[0] += 1
    assert not tok.cached
    assert "tok-abc-123" not in repr(tok) and "cached=False" in repr(tok)


async def test_a_401_triggers_exactly_one_refresh(rx: Receiver, tokens: TokenEndpoint) -> None:
    s = oauth_sink(rx, tokens)
    try:
        assert (await s.deliver([event(1)])).outcome is Outcome.ACCEPTED
        rx.faults.require_token = "tok-2"  # the API revoked tok-1; the next issued one works
        assert (await s.deliver([event(2)])).outcome is Outcome.ACCEPTED
        assert len(tokens.requests) == 2
        assert [r.status for r in rx.requests] == [201, 401, 201]

        tokens.receiver = None  # from now on the API accepts none of the issued tokens
        rx.faults.require_token = "never-issued"  # a second 401 after the refresh: hold
        d = await s.deliver([event(3)])
        assert d.outcome is Outcome.HOLD and d.status == 401
        assert len(tokens.requests) == 3  # one refresh for that 401, not a loop
    finally:
        await s.aclose()


async def test_refused_client_credentials_hold_and_endpoint_down_retries(
        rx: Receiver, tokens: TokenEndpoint, caplog: pytest.LogCaptureFixture) -> None:
    tokens.refuse = True
    s = oauth_sink(rx, tokens)
    down = sink(rx.url, auth={"oauth2": {"token_url": f"http://127.0.0.1:{free_port()}/t",
                                         "client_id": "edge", "client_secret": SECRET}})
    try:
        with caplog.at_level(logging.DEBUG):
            d = await s.deliver([event()])
            assert d.outcome is Outcome.HOLD and "invalid_client" in d.detail
            r = await down.deliver([event()])
            assert r.outcome is Outcome.RETRY and "ConnectError" in r.detail
        assert rx.stats()["received"] == 0
        tokens.refuse = False
        await s.reload_credentials()  # what the forwarder does while held
        assert (await s.deliver([event()])).outcome is Outcome.ACCEPTED
    finally:
        await s.aclose()
        await down.aclose()
    for text in (d.detail, r.detail, caplog.text, repr(s.config)):
        assert SECRET not in text
