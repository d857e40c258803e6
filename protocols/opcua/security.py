"""OPC UA security: exactly the configured policy, pinned server certificates, generated
application certificates.

Trust model: a server is trusted when its certificate (DER or PEM) is in the source's ``trust``
directory, or when a CA certificate there (BasicConstraints CA) directly issued it. The
directory is read on every connect, so dropping a certificate there takes effect at the next
reconnect without a restart. An untrusted server is refused with its SHA-256 fingerprint and
the path to copy its certificate to. Nothing is sent to an untrusted server
beyond what opening a secure channel needs: the session (and the password) comes after the
check.

Never weaker: the endpoint for the configured policy and mode is looked up on the server; if the
server does not offer it, connecting fails and says which endpoints it does offer.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from config.errors import ConnectionLostError, FatalError
from protocols.opcua.config import OpcuaSecurity, SecurityMode, SecurityPolicy

__all__ = ["CertificateFiles", "TrustDirectory", "UntrustedServerError", "apply_security",
           "certificate_uri", "fingerprint", "generate_certificate"]

_CERT_SUFFIXES = {".der", ".pem", ".crt", ".cer"}


class UntrustedServerError(ConnectionLostError):
    """The server's certificate is not in the trust directory (retried: it may be trusted later)."""


def fingerprint(cert: x509.Certificate) -> str:
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def _load_cert(data: bytes) -> x509.Certificate:
    if b"-----BEGIN CERTIFICATE-----" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def certificate_uri(cert: x509.Certificate) -> str | None:
    """The application URI in a certificate's SubjectAltName, if any."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


class TrustDirectory:
    """``client.certificate_validator`` for one session: accepts pinned certificates and
    certificates directly issued by a CA certificate in the directory.

    ``refusal`` keeps the last refusal message, because asyncua turns the validator's exception
    into a bare status code.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.refusal: str | None = None

    def _trusted(self) -> dict[str, x509.Certificate]:
        found: dict[str, x509.Certificate] = {}
        if not self.directory.is_dir():
            return found
        for path in sorted(self.directory.iterdir()):
            if path.suffix.lower() not in _CERT_SUFFIXES or not path.is_file():
                continue
            try:
                cert = _load_cert(path.read_bytes())
            except (OSError, ValueError):
                continue  # an unreadable file trusts nothing
            found[fingerprint(cert)] = cert
        return found

    async def __call__(self, cert: x509.Certificate, app: Any) -> None:
        from asyncua import ua
        from asyncua.common.utils import ServiceError

        fp = fingerprint(cert)
        subject = cert.subject.rfc4514_string() or "(no subject)"
        trusted = self._trusted()
        if fp not in trusted and not any(_issued_by(cert, ca) for ca in trusted.values()):
            uri = certificate_uri(cert) or getattr(app, "ApplicationUri", None) or "?"
            self.refusal = (
                f"the server's certificate is not trusted: subject {subject}, application URI "
                f"{uri}, SHA-256 fingerprint {fp}. If this is the right server, copy its "
                f"certificate (DER or PEM) into {self.directory}/; it is picked up at the next "
                "reconnect")
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            self.refusal = (f"the server's certificate (fingerprint {fp}) is trusted but not "
                            f"valid now: valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
                            f"{cert.not_valid_after_utc:%Y-%m-%d}")
            raise ServiceError(ua.StatusCodes.BadCertificateTimeInvalid)
        self.refusal = None


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True when ``ca`` is a CA certificate whose key signed ``cert``."""
    try:
        if not ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
        cert.verify_directly_issued_by(ca)
    except (x509.ExtensionNotFound, ValueError, TypeError, InvalidSignature):
        return False
    return True


def _policy_class(policy: SecurityPolicy) -> Any:
    from asyncua.crypto import security_policies as sp

    return {
        SecurityPolicy.BASIC256SHA256: sp.SecurityPolicyBasic256Sha256,
        SecurityPolicy.AES128_SHA256_RSAOAEP: sp.SecurityPolicyAes128Sha256RsaOaep,
        SecurityPolicy.AES256_SHA256_RSAPSS: sp.SecurityPolicyAes256Sha256RsaPss,
    }[policy]


async def apply_security(client: Any, security: OpcuaSecurity,
                         where: str) -> TrustDirectory:
    """Configure ``client`` for exactly ``security`` (policy other than None).

    Fetches the server's endpoints (over an unsecured channel, as every OPC UA client must) to
    pick the endpoint with this policy and mode; raises ConnectionLostError naming the offered
    endpoints when it is not there. Raises FatalError for unreadable local certificate files.
    """
    from asyncua import ua

    assert security.certificate and security.private_key and security.trust
    try:
        cert = _load_cert(security.certificate.read_bytes())
        security.private_key.read_bytes()
    except (OSError, ValueError) as exc:
        raise FatalError(f"{where}: cannot read the agent's certificate or key: {exc}") from exc
    uri = security.application_uri or certificate_uri(cert)
    if not uri:
        raise FatalError(f"{where}: certificate {security.certificate} has no application URI "
                         "(SubjectAltName URI); set security.application_uri or make one with "
                         "'edge-agent opcua gen-cert'")
    client.application_uri = uri
    mode = (ua.MessageSecurityMode.Sign if security.mode is SecurityMode.SIGN
            else ua.MessageSecurityMode.SignAndEncrypt)
    policy = _policy_class(security.policy)
    try:
        await client.set_security(policy, certificate=str(security.certificate),
                                  private_key=str(security.private_key), mode=mode)
    except ua.UaError as exc:
        if "No matching endpoints" in str(exc) or "no matching" in str(exc).lower():
            offered = await _offered(client)
            raise ConnectionLostError(
                f"{where}: the server offers no endpoint with policy {security.policy.value} "
                f"and mode {security.mode.value} (it offers: {offered}); the agent never falls "
                "back to a weaker policy") from exc
        raise
    validator = TrustDirectory(security.trust)
    client.certificate_validator = validator
    return validator


async def _offered(client: Any) -> str:
    try:
        endpoints = await client.connect_and_get_server_endpoints()
    except Exception:
        return "unknown"
    names = sorted({f"{ep.SecurityPolicyUri.rpartition('#')[2]}/{ep.SecurityMode.name}"
                    for ep in endpoints})
    return ", ".join(names) or "none"


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    certificate: Path
    private_key: Path
    application_uri: str
    fingerprint: str


def generate_certificate(directory: Path, application_uri: str, *,
                         hostnames: list[str] | None = None, days: int = 730,
                         name: str = "edge-agent", overwrite: bool = False,
                         server: bool = False) -> CertificateFiles:
    """Write a self-signed application certificate (DER) and key (PEM) into ``directory``.

    ``server=True`` makes a server certificate (used by the test server and the demo).
    Refuses to overwrite existing files unless asked: a replaced certificate must be trusted
    again on every server.
    """
    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert_path = directory / f"{name}.der"
    key_path = directory / f"{name}.pem"
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing and not overwrite:
        raise FatalError(f"{', '.join(str(p) for p in existing)} already exist; "
                         "use --force to replace them (servers must then trust the new one)")
    directory.mkdir(parents=True, exist_ok=True)
    hosts = hostnames or [socket.gethostname()]
    key = generate_private_key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    names += [x509.DNSName(h) for h in hosts]
    use = [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
    if not server:
        use.append(ExtendedKeyUsageOID.SERVER_AUTH)
    cert = generate_self_signed_app_certificate(key, application_uri,
                                                {"organizationName": "plant-edge-agent"},
                                                names, extended=use, days=days)
    key_path.write_bytes(dump_private_key_as_pem(key))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(encoding=Encoding.DER))
    return CertificateFiles(cert_path, key_path, application_uri, fingerprint(cert))

