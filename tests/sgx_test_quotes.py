"""SGX DCAP quotes signed under a test root CA, for the tests only (no SGX hardware here).

The same construction as dcap-qvl's own generators (tests/generate_test_certs.sh and
cli/src/bin/generate_all_samples.rs in Phala-Network/dcap-qvl, MIT), written with
`cryptography`: a root CA, a TCB signing CA and signer (they sign the TCB info and QE identity
and the PCK CRL), a PCK certificate carrying Intel's SGX extension (its FMSPC 00906EA10000 and
TCB values are the ones in that script's extension), the CRLs, and quotes (version 3) whose
QE report binds a fresh attestation key that signs header and enclave report. dcap-qvl's
`verify_with_root_ca` verifies them like real ones; only the root differs.

`QuotesUnderTestRoot` is also the quote provider of the test `teegpu api --tls` (tests/attested_api.py):
it is not part of the package, so a normal start cannot reach it.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import struct

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

INTEL_QE_VENDOR_ID = bytes.fromhex("939A7233F79C4CA9940A0DB3957F0607")
SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
# Intel's SGX extension of a PCK certificate (PPID, TCB, PCE ID, FMSPC 00906EA10000, SGX type), as
# in dcap-qvl's tests/generate_test_certs.sh
PCK_SGX_EXTENSION = bytes.fromhex(
    "308201C1301E060A2A864886F84D010D01010410D04EC06D4E6D92DC90D0AD3CF5EE2DDF30820164060A2A864886F84D010D01"
    "02308201543010060B2A864886F84D010D01020102010B3010060B2A864886F84D010D01020202010B3010060B2A864886F84D"
    "010D0102030201023010060B2A864886F84D010D0102040201023011060B2A864886F84D010D010205020200FF3010060B2A86"
    "4886F84D010D0102060201013010060B2A864886F84D010D0102070201003010060B2A864886F84D010D010208020100301006"
    "0B2A864886F84D010D0102090201003010060B2A864886F84D010D01020A0201003010060B2A864886F84D010D01020B020100"
    "3010060B2A864886F84D010D01020C0201003010060B2A864886F84D010D01020D0201003010060B2A864886F84D010D01020E"
    "0201003010060B2A864886F84D010D01020F0201003010060B2A864886F84D010D0102100201003010060B2A864886F84D010D"
    "01021102010D301F060B2A864886F84D010D01021204100B0B0202FF01000000000000000000003010060A2A864886F84D010D"
    "0103040200003014060A2A864886F84D010D0104040600906EA10000300F060A2A864886F84D010D01050A0100")
ISSUED = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
EXPIRES = datetime.datetime(2099, 12, 31, tzinfo=datetime.timezone.utc)
DEBUG_ATTRIBUTE = 0x02  # SGX attributes byte 0, bit 1


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test"),
                      x509.NameAttribute(NameOID.COUNTRY_NAME, "US")])


def _cert(subject: str, key, issuer: x509.Certificate | None, issuer_key, ca: bool, extra=()) -> x509.Certificate:
    name = _name(subject)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(ISSUED).not_valid_after(EXPIRES)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca and issuer else None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _crl(issuer: x509.Certificate, key) -> bytes:
    crl = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject).last_update(ISSUED).next_update(EXPIRES)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
           .add_extension(x509.CRLNumber(1), critical=False).sign(key, hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.DER)


def raw_signature(key, data: bytes) -> bytes:
    """ECDSA P-256 over SHA-256 as r || s, 32 bytes each (the quote's encoding)."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_public_key(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)[1:]


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def enclave_report(report_data: bytes, mr_enclave: bytes = bytes(32), mr_signer: bytes = bytes(32),
                   debug: bool = False, cpu_svn: bytes = bytes([1]) * 16) -> bytes:
    """An SGX REPORTBODY (384 bytes)."""
    attributes = bytes([DEBUG_ATTRIBUTE if debug else 0]) + bytes(15)
    body = (cpu_svn + struct.pack("<I", 0) + bytes(28) + attributes + mr_enclave + bytes(32) + mr_signer + bytes(96)
            + struct.pack("<HH", 0, 0) + bytes(60) + report_data.ljust(64, b"\0"))
    assert len(body) == 384
    return body


class QuotesUnderTestRoot:
    """A test PKI and an SGX quote provider under it: quote(report_data) -> bytes."""

    name = "test-root"  # what /health and the evidence say instead of gramine or tdx

    def __init__(self, mr_enclave: bytes = bytes.fromhex("11" * 32), debug: bool = False,
                 tcb_status: str = "UpToDate"):
        self.mr_enclave, self.debug, self.tcb_status = mr_enclave, debug, tcb_status
        self.root_key, self.ca_key, self.signer_key, self.pck_key = _key(), _key(), _key(), _key()
        self.root = _cert("Test Root CA", self.root_key, None, self.root_key, ca=True)
        self.ca = _cert("Test TCB Signing CA", self.ca_key, self.root, self.root_key, ca=True)
        self.signer = _cert("Test TCB Signer", self.signer_key, self.ca, self.ca_key, ca=False)
        self.pck = _cert("Test PCK", self.pck_key, self.root, self.root_key, ca=False,
                         extra=[x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXTENSION_OID), PCK_SGX_EXTENSION)])

    PARTS = ("root", "ca", "signer", "pck")

    @classmethod
    def kept_in(cls, directory, **kw) -> "QuotesUnderTestRoot":
        """The PKI saved in `directory` (made and saved there the first time): a server restarted
        with the same directory gets a new TLS key, but its quotes verify under the same root."""
        from pathlib import Path

        quotes, files = cls(**kw), Path(directory)
        if not (files / "pki-root.pem").exists():
            for part in cls.PARTS:
                key = getattr(quotes, f"{part}_key").private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
                (files / f"pki-{part}.pem").write_bytes(key + getattr(quotes, part).public_bytes(serialization.Encoding.PEM))
            return quotes
        for part in cls.PARTS:
            data = (files / f"pki-{part}.pem").read_bytes()
            setattr(quotes, f"{part}_key", serialization.load_pem_private_key(data, None))
            setattr(quotes, part, x509.load_pem_x509_certificate(data[data.index(b"-----BEGIN CERTIFICATE"):]))
        return quotes

    @property
    def root_der(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.DER)

    def quote(self, report_data: bytes) -> bytes:
        header = struct.pack("<HHIHH", 3, 2, 0, 1, 1) + INTEL_QE_VENDOR_ID + bytes(20)
        report = enclave_report(report_data, self.mr_enclave, debug=self.debug)
        attestation_key = _key()
        qe_auth = bytes(32)
        qe_report = enclave_report(hashlib.sha256(raw_public_key(attestation_key) + qe_auth).digest())
        chain = (pem(self.pck) + pem(self.root)).encode()
        auth = (raw_signature(attestation_key, header + report) + raw_public_key(attestation_key) + qe_report
                + raw_signature(self.pck_key, qe_report) + struct.pack("<H", len(qe_auth)) + qe_auth
                + struct.pack("<HI", 5, len(chain)) + chain)
        return header + report + struct.pack("<I", len(auth)) + auth

    def collateral_json(self) -> str:
        """The collateral (TCB info, QE identity, CRLs, issuer chains) as dcap-qvl's JSON."""
        levels = [{"tcb": {"sgxtcbcomponents": [{"svn": 0}] * 16, "pcesvn": 0}, "tcbDate": "2024-01-01T00:00:00Z",
                   "tcbStatus": self.tcb_status}]
        tcb_info = json.dumps({"id": "SGX", "version": 3, "issueDate": "2024-01-01T00:00:00Z",
                               "nextUpdate": "2099-12-31T23:59:59Z", "fmspc": "00906EA10000", "pceId": "0000",
                               "tcbType": 0, "tcbEvaluationDataNumber": 12, "tcbLevels": levels})
        qe_identity = json.dumps({
            "id": "QE", "version": 2, "issueDate": "2024-01-01T00:00:00Z", "nextUpdate": "2099-12-31T23:59:59Z",
            "tcbEvaluationDataNumber": 17, "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
            "attributes": "00" * 16, "attributesMask": "00" * 16, "mrsigner": "00" * 32, "isvprodid": 0,
            "tcbLevels": [{"tcb": {"isvsvn": 0}, "tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": "UpToDate",
                           "advisoryIDs": []}]})
        chain = pem(self.signer) + pem(self.ca) + pem(self.root)
        return json.dumps({
            "pck_crl_issuer_chain": chain, "root_ca_crl": _crl(self.root, self.root_key).hex(),
            "pck_crl": _crl(self.ca, self.ca_key).hex(), "tcb_info_issuer_chain": chain, "tcb_info": tcb_info,
            "tcb_info_signature": raw_signature(self.signer_key, tcb_info.encode()).hex(),
            "qe_identity_issuer_chain": chain, "qe_identity": qe_identity,
            "qe_identity_signature": raw_signature(self.signer_key, qe_identity.encode()).hex()})
