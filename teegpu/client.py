"""The user's side: check a `teegpu api --tls` server's TEE before sending it a prompt.

`verify_server(url, expected)` reads the certificate the server presents, verifies the quote it
carries with dcap-qvl (Intel's DCAP rules: signatures up to the root, collateral, TCB status),
then checks what the quote vouches for: the TLS key (report_data bytes 0..31), the model file's
SHA-256, the privacy mode and the teegpu version (bytes 32..63), the measurement (MRENCLAVE under
SGX, MRTD under TDX) and that the enclave is not a debug one. `attested_openai` returns an
`openai.OpenAI` client (`attested_async_openai`: an `openai.AsyncOpenAI`) whose connections accept
only that key: the check runs in the TLS handshake, before a request byte is sent. Nothing
downgrades silently: a server without attestation is refused unless `insecure=True`. `teegpu
proxy` (teegpu.proxy) does the same for tools that cannot run this code.
"""
from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field

from cryptography import x509

from teegpu.attested_tls import ATTESTATION_NONE, EVIDENCE_PATH, deployment_digest, quote_in, spki_sha256
from teegpu.config import VerifyConfig
from teegpu.errors import AttestationError

SGX_DEBUG = 0x02  # SGX attributes, byte 0
TDX_DEBUG = 0x01  # TD attributes, byte 0


@dataclass
class Verified:
    """What `verify_server` established (every line of `checks` passed)."""

    url: str
    attestation: str  # gramine, tdx, ... as the server says; "none" without a quote
    spki_sha256: bytes  # the key every later connection must present
    tcb_status: str | None = None
    tcb_info_date: str | None = None  # when Intel issued the TCB assessment the status comes from
    advisory_ids: list[str] = field(default_factory=list)
    measurement: str | None = None
    model_sha256: str | None = None
    privacy: str | None = None
    pads: str | None = None  # otp: who makes the pads' products (server, local, server-or-local)
    teegpu_version: str | None = None
    checks: list[str] = field(default_factory=list)


class KeyChanged(ssl.SSLError):
    """The server presents another key than the attested one (a restart, or someone else)."""


def _check_pin(der: bytes | None, pin: bytes) -> None:
    got = spki_sha256(x509.load_der_x509_certificate(der).public_key()) if der else b""
    if got != pin:
        raise KeyChanged(f"server key {got.hex()[:16]}... is not the attested key {pin.hex()[:16]}...")


class PinnedSocket(ssl.SSLSocket):
    """A TLS socket that fails its handshake unless the server's key is the pinned one."""

    def do_handshake(self, block=False):
        super().do_handshake(block)
        try:
            _check_pin(self.getpeercert(binary_form=True), self.context.teegpu_pin)
        except KeyChanged:
            self.close()
            raise


class PinnedObject(ssl.SSLObject):
    """The same check for asyncio's TLS (httpx.AsyncClient, AsyncOpenAI, the proxy)."""

    def do_handshake(self):
        super().do_handshake()
        _check_pin(self.getpeercert(binary_form=True), self.context.teegpu_pin)


def pinned_context(pin: bytes | None) -> ssl.SSLContext:
    """TLS without the web PKI (the certificate is self-signed): the pin is checked instead."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if pin is not None:
        ctx.sslsocket_class, ctx.sslobject_class = PinnedSocket, PinnedObject
        ctx.teegpu_pin = pin
    return ctx


def key_changed(error: BaseException | None) -> bool:
    """Whether an error (httpx wraps it twice) comes from a handshake that met another key."""
    while error is not None:
        if isinstance(error, KeyChanged):
            return True
        error = error.__cause__ or error.__context__
    return False


def _host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https":
        raise AttestationError(f"{url}: attestation needs https:// (a server started with --tls)")
    return parts.hostname, parts.port or 443


def presented_certificate(url: str, timeout_s: float = 10.0) -> x509.Certificate:
    host, port = _host_port(url)
    with socket.create_connection((host, port), timeout=timeout_s) as raw:
        with pinned_context(None).wrap_socket(raw, server_hostname=host) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def fetch_evidence(url: str, pin: bytes, timeout_s: float = 10.0) -> dict:
    import httpx

    with httpx.Client(verify=pinned_context(pin), timeout=timeout_s) as http:
        answer = http.get(url.rstrip("/") + EVIDENCE_PATH)
    if answer.status_code != 200:
        raise AttestationError(f"{url}{EVIDENCE_PATH} answered {answer.status_code}")
    try:
        return answer.json()
    except ValueError as e:
        raise AttestationError(f"{url}{EVIDENCE_PATH} is not teegpu's evidence (not JSON)") from e


def verify_quote(quote: bytes, config: VerifyConfig, now: int | None = None) -> dict:
    """dcap-qvl's verdict on the quote, as its JSON report; AttestationError if it fails."""
    import dcap_qvl

    collateral = _collateral(quote, config)
    now = int(time.time()) if now is None else now
    try:
        if config.root_ca:
            with open(config.root_ca, "rb") as f:
                report = dcap_qvl.verify_with_root_ca(quote, collateral, f.read(), now)
        else:
            report = dcap_qvl.verify(quote, collateral, now)
    except ValueError as e:
        raise AttestationError(f"quote verification failed: {e}") from e
    verdict = json.loads(report.to_json())
    verdict["tcb_info_date"] = json.loads(collateral.tcb_info).get("issueDate")
    return verdict


def _collateral(quote: bytes, config: VerifyConfig):
    import dcap_qvl

    if config.collateral:
        with open(config.collateral) as f:
            return dcap_qvl.QuoteCollateralV3.from_json(f.read())
    if config.pccs:
        try:
            return asyncio.run(dcap_qvl.get_collateral(config.pccs, quote))
        except Exception as e:  # network and PCCS errors come in many types
            raise AttestationError(f"cannot get collateral from {config.pccs}: {e}") from e
    raise AttestationError("no collateral: pass --collateral FILE or --pccs URL")


def verify_server(url: str, config: VerifyConfig, now: int | None = None) -> Verified:
    """Every check of the module docstring; AttestationError naming the first that fails."""
    import httpx

    try:
        cert = presented_certificate(url)
        pin = spki_sha256(cert.public_key())
        evidence = fetch_evidence(url, pin)
    except (OSError, httpx.HTTPError) as e:  # refused, unreachable, not TLS, another key midway
        raise AttestationError(f"cannot reach {url} to verify it: {e}") from e
    quote = quote_in(cert)
    done = Verified(url, evidence.get("attestation", ATTESTATION_NONE), pin)
    if quote is None:
        if not config.insecure_no_attestation:
            raise AttestationError(f"{url} presents no quote (attestation: {done.attestation}); pass "
                                   "--insecure-no-attestation to talk to it anyway")
        done.checks.append("NO ATTESTATION: accepted because --insecure-no-attestation was given")
        return _check_deployment(done, evidence, config, None)
    if evidence.get("quote") and base64.b64decode(evidence["quote"]) != quote:
        raise AttestationError("the evidence endpoint and the certificate carry different quotes")
    report = verify_quote(quote, config, now)
    done.tcb_status, done.tcb_info_date = report["status"], report["tcb_info_date"]
    done.advisory_ids = list(report.get("advisory_ids") or ())
    done.checks.append(f"quote signature and collateral verified by dcap-qvl (TCB {done.tcb_status})")
    if done.tcb_status not in config.allow_tcb:
        raise AttestationError(f"TCB status {done.tcb_status} is not allowed (allowed: {', '.join(config.allow_tcb)})")
    body = _report_body(report)
    _check_measurement(done, body, config)
    data = bytes.fromhex(body["report_data"])
    if data[:32] != pin:
        raise AttestationError("the quote does not vouch for the TLS key this server presents")
    done.checks.append("the quote binds the presented TLS key")
    return _check_deployment(done, evidence, config, data[32:64])


def _report_body(report: dict) -> dict:
    kind, body = next(iter(report["report"].items()))
    body["kind"] = "sgx" if kind == "SgxEnclave" else "tdx"
    return body


def _check_measurement(done: Verified, body: dict, config: VerifyConfig) -> None:
    sgx = body["kind"] == "sgx"
    flags = bytes.fromhex(body["attributes"] if sgx else body["td_attributes"])[0]
    if flags & (SGX_DEBUG if sgx else TDX_DEBUG):
        raise AttestationError(f"the quote comes from a debug {'enclave' if sgx else 'TD'}: its memory is readable")
    done.checks.append(f"not a debug {'enclave' if sgx else 'TD'}")
    name, value = ("MRENCLAVE", body["mr_enclave"]) if sgx else ("MRTD", body["mr_td"])
    done.measurement = f"{name} {value}"
    expected = config.mrenclave if sgx else config.mrtd
    if (config.mrtd if sgx else config.mrenclave) is not None:
        raise AttestationError(f"expected a {'TDX' if sgx else 'SGX'} quote, got {'SGX' if sgx else 'TDX'}")
    if expected is None:
        done.checks.append(f"{name} not pinned (pass --{name.lower()} to require one)")
    elif expected.lower() != value.lower():
        raise AttestationError(f"{name} {value} is not the expected {expected}")
    else:
        done.checks.append(f"{name} is the expected one")


def _check_deployment(done: Verified, evidence: dict, config: VerifyConfig, bound: bytes | None) -> Verified:
    """The model, mode and version the evidence names: bound by the quote, and as expected."""
    done.model_sha256, done.privacy, done.pads = (evidence.get("model_sha256"), evidence.get("privacy"),
                                                  evidence.get("pads"))
    done.teegpu_version = evidence.get("versions", {}).get("teegpu")
    if bound is not None:
        if bound != deployment_digest(str(done.model_sha256), str(done.privacy), str(done.teegpu_version),
                                      str(done.pads)):
            raise AttestationError("the quote's model/mode binding does not match the evidence "
                                   f"(model {done.model_sha256}, privacy {done.privacy}, pads {done.pads})")
        done.checks.append(f"the quote names model {str(done.model_sha256)[:16]}..., privacy {done.privacy} "
                           f"(pads {done.pads}), teegpu {done.teegpu_version}")
    if config.model_sha256 is not None and config.model_sha256.lower() != str(done.model_sha256).lower():
        raise AttestationError(f"model SHA-256 {done.model_sha256} is not the expected {config.model_sha256}")
    if config.privacy is not None and config.privacy != done.privacy:
        raise AttestationError(f"privacy mode {done.privacy} is not the expected {config.privacy}")
    if config.pads is not None and config.pads != done.pads:
        raise AttestationError(f"pads {done.pads} are not the expected {config.pads}")
    return done


def _expected(expected: VerifyConfig | None, insecure: bool) -> VerifyConfig:
    import dataclasses

    config = expected or VerifyConfig()
    return dataclasses.replace(config, insecure_no_attestation=True) if insecure else config


def attested_openai(url: str, expected: VerifyConfig | None = None, insecure: bool = False, api_key: str = "none",
                    **openai_kw):
    """An openai.OpenAI client for a verified teegpu server: every connection it opens must present
    the attested key (a reconnect to another key fails in the handshake, before the request)."""
    import httpx
    import openai

    verified = verify_server(url, _expected(expected, insecure))
    http = httpx.Client(verify=pinned_context(verified.spki_sha256))
    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, http_client=http, **openai_kw)
    client.teegpu_attestation = verified
    return client


async def attested_async_openai(url: str, expected: VerifyConfig | None = None, insecure: bool = False,
                                api_key: str = "none", **openai_kw):
    """attested_openai's async twin: `client = await attested_async_openai(url, expected)` gives an
    openai.AsyncOpenAI whose connections accept only the attested key (checked in asyncio's TLS)."""
    import httpx
    import openai

    verified = await asyncio.to_thread(verify_server, url, _expected(expected, insecure))
    http = httpx.AsyncClient(verify=pinned_context(verified.spki_sha256))
    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, http_client=http, **openai_kw)
    client.teegpu_attestation = verified
    return client
