"""What the server receives in otp mode is uniform and unrelated to the input: two very
different inputs give byte streams that neither differ from each other nor from uniform."""
import torch

from conftest import connect_engine
from teegpu.protocol import Op

CALLS = 1000
CHI2_CRITICAL_255 = 400.0  # p ~ 2e-8 for 255 degrees of freedom; an unpadded input scores millions


def wire_words(engine, x: torch.Tensor) -> torch.Tensor:
    """Send x through QKV layer 0 CALLS times; return every int64 word that went on the socket."""
    sent, send = [], engine.client._socket.send_multipart

    def spy(frames, **kw):
        sent.append(bytes(memoryview(frames[-1])))  # [delimiter, header, the padded tensor]
        return send(frames, **kw)

    engine.client._socket.send_multipart = spy
    for _ in range(CALLS):
        engine.linears.linear(Op.QKV, 0, x)
    engine.client._socket.send_multipart = send
    return torch.frombuffer(bytearray(b"".join(sent)), dtype=torch.int64)


def chi2(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_padded_frames_are_uniform_and_input_independent(smollm2, smollm2_servers):
    weights, tok = smollm2
    engine = connect_engine(weights, tok, smollm2_servers, "tcp", privacy="otp", mask_pool_rows=64)
    zeros, loud = torch.zeros(1, 576), torch.randn(1, 576) * 100
    a, b = wire_words(engine, zeros), wire_words(engine, loud)
    engine.close()
    assert a.numel() == b.numel() == CALLS * 576
    ha = torch.bincount(a.view(torch.uint8), minlength=256).double()
    hb = torch.bincount(b.view(torch.uint8), minlength=256).double()
    uniform = torch.full((256,), ha.sum().item() / 256)
    assert chi2(ha, uniform) < CHI2_CRITICAL_255
    assert chi2(hb, uniform) < CHI2_CRITICAL_255
    pooled = (ha + hb) / 2  # two-sample test: same distribution for both inputs
    assert chi2(ha, pooled) + chi2(hb, pooled) < CHI2_CRITICAL_255
    # every bit position is a fair coin for both inputs (a leak of the sign or magnitude would show)
    for words in (a, b):
        ones = torch.stack([((words >> i) & 1).sum() for i in range(64)]).double() / words.numel()
        assert ((ones - 0.5).abs() < 0.005).all()
    # no pad is ever used twice: all 2 x 576,000 words distinct
    assert torch.unique(torch.cat([a, b])).numel() == 2 * CALLS * 576
