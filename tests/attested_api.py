"""`teegpu api --tls` whose quotes come from the test PKI (tests/sgx_test_quotes.py): what the
tests start where SGX hardware would be. Not part of the package: a normal `teegpu api` cannot
select this provider (its --attestation takes auto, gramine, tdx or none).

    python tests/attested_api.py STATE_DIR [--debug-enclave] [--replay-quote FILE]
                                 [--wrong-model-binding] [--tcb-status STATUS] -- TEEGPU-API-ARGS...

Writes STATE_DIR/root_ca.der, collateral.json and quote.bin (the quote it serves), and keeps the
test PKI there (pki-*.pem): started again on the same STATE_DIR, a server has a new TLS key whose
quotes verify under the same root.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from api_process import ApiProcess  # noqa: E402
from sgx_test_quotes import QuotesUnderTestRoot  # noqa: E402

from teegpu.api.app import run_api  # noqa: E402
from teegpu.cli import build_parser  # noqa: E402
from teegpu.config import ApiConfig, EngineConfig, SchedulerConfig, VerifyConfig, from_args  # noqa: E402
from teegpu.tee.attestation import model_sha256  # noqa: E402

LAUNCHER = [os.path.abspath(__file__)]
MRENCLAVE = "11" * 32  # what QuotesUnderTestRoot measures


class Provider:
    """QuotesUnderTestRoot with the faults a test asks for."""

    def __init__(self, quotes: QuotesUnderTestRoot, state: Path, replay: str | None, wrong_model: bool):
        self.name, self.quotes, self.state = quotes.name, quotes, state
        self.replay, self.wrong_model = replay, wrong_model

    def quote(self, report_data: bytes) -> bytes:
        if self.wrong_model:  # vouch for the key, but for another model than the evidence names
            report_data = report_data[:32] + bytes(32)
        quote = Path(self.replay).read_bytes() if self.replay else self.quotes.quote(report_data)
        (self.state / "quote.bin").write_bytes(quote)
        return quote


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("state")
    p.add_argument("--debug-enclave", action="store_true")
    p.add_argument("--replay-quote")
    p.add_argument("--wrong-model-binding", action="store_true")
    p.add_argument("--tcb-status", default="UpToDate", help="what the collateral says of the platform")
    ours, api_args = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
    opts = p.parse_args(ours)
    state = Path(opts.state)
    state.mkdir(parents=True, exist_ok=True)
    # the state directory keeps the test PKI: a restart with the same one is a new key under the same root
    quotes = QuotesUnderTestRoot.kept_in(state, debug=opts.debug_enclave, tcb_status=opts.tcb_status)
    (state / "root_ca.der").write_bytes(quotes.root_der)
    (state / "collateral.json").write_text(quotes.collateral_json())
    args = build_parser().parse_args(["api", *api_args])
    run_api(from_args(ApiConfig, args), from_args(EngineConfig, args), from_args(SchedulerConfig, args),
            provider=Provider(quotes, state, opts.replay_quote, opts.wrong_model_binding))


def start(tmp_path: Path, model, *faults: str, launcher=LAUNCHER, state: Path | None = None,
          api_args=()) -> tuple[ApiProcess, Path]:
    """A real `teegpu api --tls` on the model, quoting under the PKI kept in `state` (a new one by default)."""
    state = state or tmp_path / f"state-{len(list(tmp_path.iterdir()))}"
    prefix = [*launcher, str(state), *faults, "--"] if launcher else None
    return ApiProcess("--model", str(model), "--tls", *api_args, launcher=prefix), state


def expect(state: Path, model, **kw) -> VerifyConfig:
    """What a user of that server requires: its test root, MRENCLAVE, model and plain privacy."""
    return VerifyConfig(root_ca=str(state / "root_ca.der"), collateral=str(state / "collateral.json"),
                        mrenclave=MRENCLAVE, model_sha256=model_sha256(Path(model)), privacy="plain", **kw)


def proxy_args(state: Path, model, **overrides) -> list[str]:
    """`teegpu proxy` flags that expect what `expect` does (flag=value overrides)."""
    e = expect(state, model)
    args = {"--root-ca": e.root_ca, "--collateral": e.collateral, "--mrenclave": e.mrenclave,
            "--model-sha256": e.model_sha256, "--privacy": e.privacy, **overrides}
    return [x for k, v in args.items() for x in (k, v)]


if __name__ == "__main__":
    main()
