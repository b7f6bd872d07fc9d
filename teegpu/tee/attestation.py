"""Quotes from the TEE the trusted side runs in, and the attested TLS identity built on them.

A quote provider turns 64 bytes of report data into a quote signed by the CPU:
- gramine: Gramine's /dev/attestation (write user_report_data, read quote); the manifest needs
  `sgx.remote_attestation = "dcap"` (gramine/: RA_TYPE=dcap);
- tdx: Linux's configfs-tsm (/sys/kernel/config/tsm/report/NAME/inblob, then outblob);
- none: no quote; the API says `attestation: none` and clients refuse it unless told otherwise.
`--attestation auto` picks the first that is present. The TLS key is made here, at start, and never
leaves the process: it reaches the TLS library through an anonymous in-memory file.
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from teegpu.attested_tls import ATTESTATION_NONE, QUOTE_OID, report_data
from teegpu.errors import ConfigError

GRAMINE_DIR = Path("/dev/attestation")
TSM_REPORTS = Path("/sys/kernel/config/tsm/report")


class GramineQuotes:
    name = "gramine"

    def quote(self, data: bytes) -> bytes:
        (GRAMINE_DIR / "user_report_data").write_bytes(data)
        return (GRAMINE_DIR / "quote").read_bytes()


class TdxQuotes:
    name = "tdx"
    _entries = itertools.count()

    def quote(self, data: bytes) -> bytes:
        entry = TSM_REPORTS / f"teegpu-{os.getpid()}-{next(self._entries)}"
        entry.mkdir()
        try:
            (entry / "inblob").write_bytes(data)
            return (entry / "outblob").read_bytes()
        finally:
            entry.rmdir()


PROVIDERS = {"gramine": GramineQuotes, "tdx": TdxQuotes}


def detect() -> str:
    """The TEE this process runs in, as far as its quote interfaces show."""
    if (GRAMINE_DIR / "quote").exists():
        return "gramine"
    if TSM_REPORTS.is_dir():
        return "tdx"
    return ATTESTATION_NONE


def quote_provider(kind: str):
    """The provider for --attestation KIND (auto: detected); None for none."""
    kind = detect() if kind == "auto" else kind
    if kind == ATTESTATION_NONE:
        return None
    if kind not in PROVIDERS:
        raise ConfigError(f"attestation {kind!r}: choose one of auto, none, {', '.join(PROVIDERS)}")
    return PROVIDERS[kind]()


@dataclass
class AttestedIdentity:
    """The TLS key and certificate the API serves with, and the evidence that vouches for them."""

    attestation: str  # the provider's name, or "none"
    cert_pem: bytes
    key_pem: bytes  # unencrypted: kept in this process's memory only
    quote: bytes | None
    report_data: bytes

    @classmethod
    def create(cls, provider, model_sha256: str, privacy: str, version: str, host: str,
               pads: str = "local") -> "AttestedIdentity":
        key = ec.generate_private_key(ec.SECP256R1())
        data = report_data(key.public_key(), model_sha256, privacy, version, pads)
        quote = provider.quote(data) if provider is not None else None
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "teegpu attested API")])
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=365))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(host or "localhost")]), critical=False))
        if quote is not None:
            builder = builder.add_extension(x509.UnrecognizedExtension(QUOTE_OID, quote), critical=False)
        cert = builder.sign(key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cls(provider.name if provider is not None else ATTESTATION_NONE,
                   cert.public_bytes(serialization.Encoding.PEM), key_pem, quote, data)

    def tls_files(self) -> tuple[str, str]:
        """(certificate path, key path) for the TLS library: anonymous in-memory files of this
        process (memfd), so the key is never written to a file system. Where memfd is missing,
        a file in a private temporary directory (inside Gramine, mount /tmp as tmpfs: it then
        lives in enclave memory too)."""
        paths = []
        for name, data in (("teegpu-cert", self.cert_pem), ("teegpu-key", self.key_pem)):
            try:
                fd = os.memfd_create(name)
                path = f"/proc/self/fd/{fd}"
            except (AttributeError, OSError):
                path = os.path.join(tempfile.mkdtemp(prefix="teegpu-tls-"), name)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            paths.append(path)
        return paths[0], paths[1]

    def evidence(self, model_sha256: str, privacy: str, versions: dict, pads: str = "local") -> dict:
        import base64

        return {"attestation": self.attestation,
                "quote": base64.b64encode(self.quote).decode() if self.quote else None,
                "certificate": self.cert_pem.decode(), "report_data": self.report_data.hex(),
                "model_sha256": model_sha256, "privacy": privacy, "pads": pads, "versions": versions}


def model_sha256(path: Path) -> str:
    """SHA-256 of the model file; of a directory, over its files' names and SHA-256s in order."""
    from teegpu.model.loading import file_sha256

    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()
