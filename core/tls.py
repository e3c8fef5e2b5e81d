"""TLS server contexts for the node's listeners (HL7 MLLP; the DICOM SCP's is the same rule):
TLS 1.2 or newer, our certificate and key; with a CA bundle, peers must present a client
certificate it signed (mutual TLS)."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_ssl_context(certfile: Path, keyfile: Path, cafile: Path | None) -> ssl.SSLContext:
    """A server-side context; `cafile` set = client certificates required and verified."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(certfile), keyfile=str(keyfile))
    if cafile is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(cafile))
    return ctx
