"""otp mode's integers change the model's predictions by less than the issue allows, on real text."""
from pathlib import Path

import torch
import torch.nn.functional as F

from conftest import connect_engine
from teegpu.tee.engine import Engine, GenerationConfig
from teegpu.tee.linears import LocalLinears
from test_split_matches_reference import PROMPTS

TEXT = Path(__file__).parents[1] / "bench" / "sample_text.txt"


def fidelity(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || logits) in nats) over positions."""
    top1 = (logits.argmax(-1) == reference.argmax(-1)).double().mean().item()
    kl = F.kl_div(F.log_softmax(logits.double(), -1), F.log_softmax(reference.double(), -1), log_target=True,
                  reduction="none").sum(-1).mean().item()
    return top1, kl


def test_otp_predictions_match_float32_on_128_positions(smollm2, smollm2_servers):
    weights, tok = smollm2
    ids = tok.encode(TEXT.read_text())[:128]
    reference = Engine(weights, tok, LocalLinears(weights))
    engine = connect_engine(weights, tok, smollm2_servers, "shm", privacy="otp", mask_pool_rows=8)
    ref = reference.forward(ids, 0, reference.new_cache(len(ids)), all_logits=True)
    got = engine.forward(ids, 0, engine.new_cache(len(ids)), all_logits=True)
    top1, kl = fidelity(got, ref)
    print(f"otp vs float32 over {len(ids)} positions: top-1 {top1:.4f}, KL {kl:.2e} nats")
    assert top1 >= 0.99 and kl <= 0.005
    for prompt, chat in PROMPTS:  # and greedy generations are the same
        gen = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
        assert engine.generate(prompt, gen, chat=chat).token_ids == reference.generate(prompt, gen, chat=chat).token_ids
    engine.close()
