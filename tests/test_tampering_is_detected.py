"""A lying server is caught by --verify before any token computed from its lie is emitted.

The liar is the real server behind a proxy (in this process) that rewrites chosen replies.
"""
import pytest
import torch

from rewriting_proxy import RewritingProxy
from teegpu.errors import IntegrityError
from teegpu.options import rpcs_per_forward
from teegpu.protocol import LINEAR_OPS, Op, TensorDesc, decode_header, encode_header, tensor_frame
from teegpu.tee.engine import Engine, GenerationConfig

TAMPERS = ["noise", "plus_one", "minus_one", "top_bit", "zero", "replay", "swap_rows", "wrong_shape", "wrong_dtype"]
# otp: the lies its ring check sees differently from the float one (an otp engine costs seconds to build)
OTP_TAMPERS = ["noise", "plus_one", "top_bit", "replay", "swap_rows", "wrong_dtype"]
FORWARD = rpcs_per_forward(30)


class TamperingProxy(RewritingProxy):
    """Forwards requests to the real server; from linear request number `start` on, rewrites the
    reply of QKV layer 0 (every op for noise/zero) the way `mode` says."""

    def __init__(self, server_url: str, mode: str, start: int):
        self.mode, self.start, self.linear_requests, self.tampered = mode, start, 0, 0
        self.previous = None  # the last honest QKV layer-0 reply, for replay
        super().__init__(server_url)

    def _rewrite(self, reply):
        head = decode_header(reply[0])
        if head.op not in [int(o) for o in LINEAR_OPS] + [int(Op.LM_HEAD)]:
            return reply
        n = self.linear_requests
        self.linear_requests += 1
        target = head.op == Op.QKV and head.layer == 0
        if target and n < self.start:
            self.previous = reply
        if n < self.start or not (target or self.mode in ("noise", "zero")):
            return reply
        self.tampered += 1
        desc = head.tensors[0]
        out = torch.frombuffer(bytearray(reply[1]), dtype=desc.dtype).view(desc.shape).clone()
        mode, is_int = self.mode, desc.dtype == torch.int64
        if mode == "replay":
            return [encode_header(head.op, head.request_id, head.layer, decode_header(self.previous[0]).tensors),
                    self.previous[1]]
        if mode == "wrong_shape":
            out = out[:, :-1].contiguous()
        elif mode == "wrong_dtype":
            other = torch.float64 if is_int else torch.int32  # same item size, other type
            return [encode_header(head.op, head.request_id, head.layer, [TensorDesc(other, desc.shape)]), reply[1]]
        elif mode == "noise":
            out += torch.randint(-1000, 1000, out.shape) if is_int else torch.randn(out.shape) * 0.05
        elif mode in ("plus_one", "minus_one"):
            out[0, 5] += 1 if mode == "plus_one" else -1
        elif mode == "top_bit":
            out[0, 5] += -(1 << 63) if is_int else 2.0 ** 20  # 2^(k-1) in the ring
        elif mode == "zero":
            out.zero_()
        elif mode == "swap_rows":
            out[[0, 1]] = out[[1, 0]]
        return [encode_header(head.op, head.request_id, head.layer, [out]), bytes(tensor_frame(out))]


def run_tampered(weights, tok, server_url, privacy, mode, verify=True):
    """(tokens streamed, exception) of a generation through a proxy tampering as `mode` says."""
    start = 2 * FORWARD if mode == "replay" else 0  # replay: the third forward gets the second's reply
    proxy = TamperingProxy(server_url, mode, start)
    engine = Engine.connect(weights, tok, proxy.url, timeout_ms=20_000, privacy=privacy, verify=verify)
    streamed = []
    error = None
    try:
        engine.generate("The capital of France is", GenerationConfig(max_new_tokens=4, stop_at_eos=False),
                        on_text=streamed.append)
    except IntegrityError as e:
        error = e
    finally:
        engine.close()
        proxy.close()
    assert proxy.tampered >= 1
    return streamed, error


@pytest.mark.parametrize("mode, privacy", [(m, "plain") for m in TAMPERS] + [(m, "otp") for m in OTP_TAMPERS])
def test_tampering_is_detected_before_any_token(mode, privacy, smollm2, smollm2_servers):
    weights, tok = smollm2
    streamed, error = run_tampered(weights, tok, smollm2_servers("tcp", privacy=privacy), privacy, mode)
    assert isinstance(error, IntegrityError), f"{mode} went unnoticed"
    assert error.op in ("QKV", "O", "GATE_UP", "DOWN", "LM_HEAD") and str(error.layer) in str(error)
    if mode == "replay":  # two honest forwards emitted their tokens, the third emitted nothing
        assert error.op == "QKV" and error.layer == 0
        assert len("".join(streamed)) > 0 and len(streamed) <= 2
    else:
        assert streamed == []


def test_without_verify_a_small_lie_goes_through(smollm2, smollm2_servers):
    """The control: the same +1 is not caught when nothing checks (so the test above can fail)."""
    weights, tok = smollm2
    streamed, error = run_tampered(weights, tok, smollm2_servers("tcp"), "plain", "plus_one", verify=False)
    assert error is None and streamed
