"""The trust directory that decides which OPC UA server certificates the agent accepts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asyncua.common.utils import ServiceError
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from protocols.opcua.security import TrustDirectory, fingerprint

_KEYS: dict[str, rsa.RSAPrivateKey] = {}


def _key(name: str) -> rsa.RSAPrivateKey:
    if name not in _KEYS:
        _KEYS[name] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _KEYS[name]


def make_cert(name: str, issuer: str | None = None, *, ca: bool = False,
              days: tuple[int, int] = (-1, 30)) -> x509.Certificate:
    """A certificate for ``name``, self-signed or signed by ``issuer``'s key."""
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer or name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(_key(name).public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now + timedelta(days=days[0]))
               .not_valid_after(now + timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectAlternativeName(
                   [x509.UniformResourceIdentifier(f"urn:{name}")]), critical=False))
    return builder.sign(_key(issuer or name), hashes.SHA256())


def put(directory: Path, name: str, cert: x509.Certificate, pem: bool = False) -> None:
    directory.mkdir(exist_ok=True)
    data = cert.public_bytes(Encoding.PEM if pem else Encoding.DER)
    (directory / f"{name}.{'pem' if pem else 'der'}").write_bytes(data)


async def accepts(trust: TrustDirectory, cert: x509.Certificate) -> bool:
    try:
        await trust(cert, None)
    except ServiceError:
        assert trust.refusal
        return False
    assert trust.refusal is None
    return True


async def test_pinned_certificate_is_accepted_in_der_or_pem(tmp_path: Path) -> None:
    server = make_cert("plc-1")
    trust = TrustDirectory(tmp_path / "trusted")
    assert not await accepts(trust, server)
    assert fingerprint(server) in (trust.refusal or "")
    assert str(tmp_path / "trusted") in (trust.refusal or "")
    assert "urn:plc-1" in (trust.refusal or "")
    put(tmp_path / "trusted", "plc-1", server, pem=True)
    assert await accepts(trust, server)  # read again on every call: no restart needed


async def test_certificate_issued_by_a_trusted_ca_is_accepted(tmp_path: Path) -> None:
    put(tmp_path / "trusted", "plant-ca", make_cert("plant-ca", ca=True))
    trust = TrustDirectory(tmp_path / "trusted")
    assert await accepts(trust, make_cert("plc-2", issuer="plant-ca"))
    assert not await accepts(trust, make_cert("plc-3", issuer="other-ca"))


async def test_a_trusted_leaf_does_not_vouch_for_what_its_key_signed(tmp_path: Path) -> None:
    put(tmp_path / "trusted", "plc-4", make_cert("plc-4", ca=False))
    trust = TrustDirectory(tmp_path / "trusted")
    assert not await accepts(trust, make_cert("rogue", issuer="plc-4"))


async def test_expired_pinned_certificate_is_refused_with_dates(tmp_path: Path) -> None:
    old = make_cert("plc-5", days=(-400, -10))
    put(tmp_path / "trusted", "plc-5", old)
    trust = TrustDirectory(tmp_path / "trusted")
    assert not await accepts(trust, old)
    assert "not valid now" in (trust.refusal or "")


@pytest.mark.parametrize("junk", [b"", b"not a certificate"])
async def test_unreadable_files_trust_nothing(tmp_path: Path, junk: bytes) -> None:
    (tmp_path / "trusted").mkdir()
    (tmp_path / "trusted" / "broken.der").write_bytes(junk)
    assert not await accepts(TrustDirectory(tmp_path / "trusted"), make_cert("plc-6"))
