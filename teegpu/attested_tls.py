"""What an attested TLS certificate says, shared by the trusted side that makes it and the client
that checks it (docs/security.md, "Attested TLS").

The trusted side's TLS key is bound to its TEE by the quote's 64 bytes of report data:
    bytes  0..31: SHA-256 of the certificate's SubjectPublicKeyInfo (DER), as Gramine's RA-TLS;
    bytes 32..63: SHA-256 of "MODEL_SHA256|PRIVACY|TEEGPU_VERSION", naming the model and the mode.
The quote travels in the certificate under Gramine's RA-TLS quote OID, so Gramine's own
verifiers find it too, and again at GET /.well-known/teegpu-attestation with the rest of the
evidence.
"""
from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

# Gramine's RA-TLS extension for a raw SGX/TDX quote (1.2.840.113741.1337.6): the one every Gramine
# ra_tls verifier reads. (The TCG DICE "tagged evidence" OID 2.23.133.5.4.9 wraps the quote in CBOR.)
QUOTE_OID = x509.ObjectIdentifier("1.2.840.113741.1337.6")
EVIDENCE_PATH = "/.well-known/teegpu-attestation"
ATTESTATION_NONE = "none"


def spki_sha256(public_key) -> bytes:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def deployment_digest(model_sha256: str, privacy: str, version: str, pads: str) -> bytes:
    return hashlib.sha256(f"{model_sha256}|{privacy}|pads {pads}|{version}".encode()).digest()


def report_data(public_key, model_sha256: str, privacy: str, version: str, pads: str) -> bytes:
    """The 64 bytes a quote must carry for this key, model, mode (with who makes the pads) and teegpu version."""
    return spki_sha256(public_key) + deployment_digest(model_sha256, privacy, version, pads)


def quote_in(cert: x509.Certificate) -> bytes | None:
    """The quote a certificate carries, or None."""
    try:
        return cert.extensions.get_extension_for_oid(QUOTE_OID).value.value
    except x509.ExtensionNotFound:
        return None
