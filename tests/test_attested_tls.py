"""The user verifies the enclave before sending a prompt: real DCAP verification (dcap-qvl) of real
sample quotes, and a real `teegpu api --tls` whose quotes come from a test PKI (no SGX here; see
tests/sgx_test_quotes.py), checked by `teegpu verify` and `attested_openai`."""
import calendar
import dataclasses
import hashlib
import time
from pathlib import Path

import dcap_qvl
import httpx
import openai
import pytest

from api_process import ApiProcess
from attested_api import MRENCLAVE, expect, start
from sgx_test_quotes import QuotesUnderTestRoot
from teegpu.attested_tls import EVIDENCE_PATH
from teegpu.cli import main as cli_main
from teegpu.client import attested_openai, pinned_context, verify_quote, verify_server
from teegpu.config import ApiConfig, VerifyConfig
from teegpu.errors import AttestationError, ConfigError
from teegpu.tee.attestation import model_sha256

SAMPLES = Path(__file__).with_name("data") / "dcap-qvl"  # MIT, from Phala-Network/dcap-qvl's sample/


def at(when: str) -> int:
    return calendar.timegm(time.strptime(when, "%Y-%m-%dT%H:%M:%SZ"))


# ---- the verifier on real quotes ----

@pytest.mark.parametrize("name,status", [("sgx_quote", "ConfigurationAndSWHardeningNeeded"),
                                         ("tdx_quote", "UpToDate")])
def test_real_sample_quotes_verify_within_their_collateral(name, status):
    quote = (SAMPLES / name).read_bytes()
    config = VerifyConfig(collateral=str(SAMPLES / f"{name}_collateral.json"))
    assert verify_quote(quote, config, now=at("2025-07-01T00:00:00Z"))["status"] == status
    flipped = bytearray(quote)
    flipped[200] ^= 0x01  # inside the signed report body
    with pytest.raises(AttestationError, match="verification failed"):
        verify_quote(bytes(flipped), config, now=at("2025-07-01T00:00:00Z"))
    with pytest.raises(AttestationError, match="expired"):  # the collateral's nextUpdate is 2025-07-19
        verify_quote(quote, config, now=at("2025-09-01T00:00:00Z"))


def test_test_pki_quotes_verify_only_under_their_root(tmp_path):
    quotes = QuotesUnderTestRoot()
    data = hashlib.sha256(b"key").digest() + hashlib.sha256(b"model").digest()
    quote = quotes.quote(data)
    collateral = dcap_qvl.QuoteCollateralV3.from_json(quotes.collateral_json())
    report = dcap_qvl.verify_with_root_ca(quote, collateral, quotes.root_der, int(time.time()))
    assert report.status == "UpToDate" and data.hex() in report.to_json()
    with pytest.raises(ValueError):
        dcap_qvl.verify(quote, collateral, int(time.time()))  # Intel's root did not sign it


# ---- a real attested server ----

@pytest.fixture(scope="module")
def attested(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("attested")
    api, state = start(root, tiny_model_dir)
    yield api, state, root
    api.stop()


def test_verify_accepts_the_attested_server_and_chat_works(attested, tiny_model_dir, capsys):
    api, state, _ = attested
    assert api.url.startswith("https://")
    e = expect(state, tiny_model_dir)
    argv = ["verify", api.url, "--root-ca", e.root_ca, "--collateral", e.collateral, "--mrenclave", MRENCLAVE,
            "--model-sha256", e.model_sha256, "--privacy", "plain"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "binds the presented TLS key" in out and "MRENCLAVE is the expected one" in out
    client = attested_openai(api.url, expected=e)
    reply = client.chat.completions.create(model=Path(tiny_model_dir).name, messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=5, temperature=0)
    assert reply.choices[0].message.content and client.teegpu_attestation.tcb_status == "UpToDate"
    evidence = httpx.get(api.url + EVIDENCE_PATH, verify=pinned_context(client.teegpu_attestation.spki_sha256)).json()
    assert evidence["attestation"] == "test-root" and evidence["model_sha256"] == e.model_sha256


@pytest.mark.parametrize("field,value,message", [
    ("mrenclave", "22" * 32, "MRENCLAVE"), ("model_sha256", "00" * 32, "model SHA-256"), ("privacy", "otp", "privacy"),
    ("mrtd", "33" * 48, "expected a TDX quote")])
def test_wrong_expectations_are_refused(attested, tiny_model_dir, field, value, message):
    api, state, _ = attested
    with pytest.raises(AttestationError, match=message):
        verify_server(api.url, dataclasses.replace(expect(state, tiny_model_dir), **{field: value}))
    with pytest.raises(AttestationError, match="collateral"):
        verify_server(api.url, VerifyConfig(root_ca=str(state / "root_ca.der")))


def test_a_client_pinned_to_one_server_refuses_another_key(attested, tiny_model_dir):
    api, state, root = attested
    client = attested_openai(api.url, expected=expect(state, tiny_model_dir))
    other, _ = start(root, tiny_model_dir)  # same code, same model, its own key
    try:
        client.base_url = other.url + "/v1"  # the same pinned transport, another server
        with pytest.raises(openai.APIConnectionError):
            client.models.list()
    finally:
        other.stop()


@pytest.mark.parametrize("fault,message", [("--debug-enclave", "(?i)debug"),  # dcap-qvl refuses it first; teegpu checks again
                                           ("--wrong-model-binding", "model/mode binding"),
                                           ("--replay-quote", "does not vouch for the TLS key")])
def test_lying_servers_are_refused(attested, tiny_model_dir, fault, message):
    _, state, root = attested
    faults = [fault, str(state / "quote.bin")] if fault == "--replay-quote" else [fault]  # another server's quote
    liar, liar_state = start(root, tiny_model_dir, *faults)
    try:
        e = expect(liar_state, tiny_model_dir) if fault != "--replay-quote" else expect(state, tiny_model_dir)
        with pytest.raises(AttestationError, match=message):
            attested_openai(liar.url, expected=e)
    finally:
        liar.stop()


def test_a_platform_whose_tcb_is_not_up_to_date_is_refused_unless_allowed(attested, tiny_model_dir, capsys):
    _, _, root = attested
    stale, state = start(root, tiny_model_dir, "--tcb-status", "OutOfDate")
    try:
        e = expect(state, tiny_model_dir)
        with pytest.raises(AttestationError, match="TCB status OutOfDate is not allowed"):
            verify_server(stale.url, e)
        argv = ["verify", stale.url, "--root-ca", e.root_ca, "--collateral", e.collateral]
        assert cli_main(argv) == 2 and "OutOfDate" in capsys.readouterr().err
        assert cli_main([*argv, "--allow-tcb", "OutOfDate"]) == 0
        assert "TCB OutOfDate" in capsys.readouterr().out
    finally:
        stale.stop()


def test_a_server_without_attestation_is_refused_unless_told(tmp_path, tiny_model_dir, capsys):
    api, _ = start(tmp_path, tiny_model_dir, launcher=None)  # plain `teegpu api --tls` here: attestation none
    try:
        assert httpx.get(api.url + "/health", verify=False).json()["attestation"] == "none"
        assert httpx.get(api.url + EVIDENCE_PATH, verify=False).json()["quote"] is None
        with pytest.raises(AttestationError, match="insecure-no-attestation"):
            attested_openai(api.url)
        assert cli_main(["verify", api.url]) == 2
        assert "presents no quote" in capsys.readouterr().err
        assert cli_main(["verify", api.url, "--insecure-no-attestation"]) == 0
        assert "NO ATTESTATION" in capsys.readouterr().out
        client = attested_openai(api.url, insecure=True)  # pinned all the same
        assert client.models.list().data[0].id == Path(tiny_model_dir).name
    finally:
        api.stop()


def test_only_real_quote_sources_can_be_chosen():
    with pytest.raises(SystemExit) as refused:  # argparse: not a choice
        cli_main(["api", "--tls", "--attestation", "test-root"])
    assert refused.value.code == 2
    with pytest.raises(ConfigError, match="needs --tls"):
        ApiConfig(attestation="gramine")
    with pytest.raises(ConfigError, match="not hex"):
        VerifyConfig(mrenclave="xyz")


def test_quote_sources_are_detected_and_gramine_is_driven_through_its_files(tmp_path, monkeypatch):
    from teegpu.tee import attestation

    monkeypatch.setattr(attestation, "GRAMINE_DIR", tmp_path / "attestation")
    monkeypatch.setattr(attestation, "TSM_REPORTS", tmp_path / "tsm")
    assert attestation.detect() == "none" and attestation.quote_provider("auto") is None
    (tmp_path / "tsm").mkdir()
    assert attestation.detect() == "tdx"
    (tmp_path / "attestation").mkdir()
    (tmp_path / "attestation" / "quote").write_bytes(b"QUOTE")  # Gramine writes it after user_report_data
    assert attestation.detect() == "gramine"
    provider = attestation.quote_provider("auto")
    assert provider.quote(b"\x07" * 64) == b"QUOTE"
    assert (tmp_path / "attestation" / "user_report_data").read_bytes() == b"\x07" * 64
