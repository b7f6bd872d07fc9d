"""`teegpu api --tls` whose quotes come from the test PKI (tests/sgx_test_quotes.py): what the
tests start where SGX hardware would be. Not part of the package: a normal `teegpu api` cannot
select this provider (its --attestation takes auto, gramine, tdx or none).

    python tests/attested_api.py STATE_DIR [--debug-enclave] [--replay-quote FILE]
                                 [--wrong-model-binding] [--tcb-status STATUS] -- TEEGPU-API-ARGS...

Writes STATE_DIR/root_ca.der, collateral.json and quote.bin (the quote it serves).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sgx_test_quotes import QuotesUnderTestRoot  # noqa: E402

from teegpu.api.app import run_api  # noqa: E402
from teegpu.cli import build_parser  # noqa: E402
from teegpu.config import ApiConfig, EngineConfig, SchedulerConfig, from_args  # noqa: E402


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
    quotes = QuotesUnderTestRoot(debug=opts.debug_enclave, tcb_status=opts.tcb_status)
    (state / "root_ca.der").write_bytes(quotes.root_der)
    (state / "collateral.json").write_text(quotes.collateral_json())
    args = build_parser().parse_args(["api", *api_args])
    run_api(from_args(ApiConfig, args), from_args(EngineConfig, args), from_args(SchedulerConfig, args),
            provider=Provider(quotes, state, opts.replay_quote, opts.wrong_model_binding))


if __name__ == "__main__":
    main()
