"""TLS client contexts for the HTTP sinks and the fleet heartbeat.

Verification is on by default against the system trust store; ``ca_file`` replaces the store with
a private CA (plant PKI); ``client_cert``/``client_key`` add a client certificate for mutual TLS.
``verify: false`` exists for lab set-ups only and logs a warning every time a context is built.
TLS 1.2 is the minimum.

A context that cannot be built (missing or unreadable file, key that does not match) raises
``TlsSetupError`` naming the file; the sink turns that into a held sink with the reason, so the
agent keeps collecting and delivers once the files are fixed.
"""

from __future__ import annotations

import logging
import ssl

from agent.sinks.config import TlsConfig
from config.errors import PermanentError

__all__ = ["TlsSetupError", "client_context"]

log = logging.getLogger(__name__)


class TlsSetupError(PermanentError):
    """The TLS files of a sink cannot be used (a person has to fix them)."""


def client_context(tls: TlsConfig, what: str) -> ssl.SSLContext:
    """A client context for ``what`` (a name for messages, e.g. ``sink erp``)."""
    try:
        if tls.ca_file is not None:
            ctx = ssl.create_default_context(cafile=str(tls.ca_file))
        else:
            ctx = ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"{what}: cannot load the CA file {tls.ca_file}: "
                            f"{_reason(exc)}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify:
        log.warning("%s: TLS certificate verification is OFF (tls.verify: false); anyone on the "
                    "path can read and change what is sent", what)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.client_cert is not None:
        key = str(tls.client_key) if tls.client_key is not None else None
        try:
            ctx.load_cert_chain(str(tls.client_cert), key)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(f"{what}: cannot load the client certificate {tls.client_cert}"
                                f"{' / key ' + key if key else ''}: {_reason(exc)}") from exc
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
