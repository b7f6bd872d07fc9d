"""bfloat16 / float16 compared with transformers in the same dtype the way serving engines compare
(vLLM's check_logprobs_close): reduced precision is not bitwise across kernels, so logits agree
within a bound per dtype, and greedy tokens agree until a near-tie, where each side's token is in
the other's top-k and the comparison stops (docs/fidelity.md, claim 2). The split itself adds no
error (test_split_equals_in_process.py)."""
import functools

import pytest
import torch

from conftest import connect_engine
from teegpu.tee.engine import Engine
from teegpu.tee.linears import LocalLinears
from test_split_matches_reference import PROMPTS

STEPS = 16
TOP_K = 5
# max |logit - transformers' logit| over every position of prompt + continuation; about 1.5x the
# distance of transformers' own model in that dtype from float32 on these prompts (docs/fidelity.md)
LOGIT_BOUND = {torch.bfloat16: 2.5, torch.float16: 0.25}


def greedy_with_logits(engine: Engine, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    cache = engine.new_cache(len(ids) + steps)
    logits = [engine.forward(ids, 0, cache)[-1]]
    tokens = [int(logits[-1].argmax())]
    for i in range(steps - 1):
        logits.append(engine.forward([tokens[-1]], len(ids) + i, cache)[-1])
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


@functools.cache
def _hf_generate(model, ids: tuple[int, ...], steps: int):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), [step[0].float() for step in out.logits]


def hf_greedy_with_logits(model, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and their logits, computed once per model and prompt."""
    return _hf_generate(model, tuple(ids), steps)


def assert_greedy_close(ours, ours_logits, ref, ref_logits, k: int = TOP_K) -> int:
    """vLLM's rule: equal tokens until the first difference; there each token is in the other
    side's top-k, and nothing after it is compared. Returns how many tokens were equal."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a == b:
            continue
        assert a in ref_logits[i].topk(k).indices.tolist(), f"step {i}: our token {a} not in the reference's top-{k}"
        assert b in ours_logits[i].topk(k).indices.tolist(), f"step {i}: reference token {b} not in our top-{k}"
        return i
    return len(ours)


def check_against(engine: Engine, reference, dtype: torch.dtype) -> None:
    for prompt, chat in PROMPTS:
        ids = engine.encode(prompt, chat=chat)
        ref, ref_logits = hf_greedy_with_logits(reference, ids, STEPS)
        ours, ours_logits = greedy_with_logits(engine, ids, STEPS)
        assert_greedy_close(ours, ours_logits, ref, ref_logits)
        seq = ids + ref  # both models read the same tokens: every position's logits compared
        with torch.inference_mode():
            want = reference(torch.tensor([seq])).logits[0].float()
        got = engine.forward(seq, 0, engine.new_cache(len(seq)), all_logits=True)
        assert (got - want).abs().max() <= LOGIT_BOUND[dtype], prompt


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_split_is_close_to_transformers_in_its_dtype(dtype, smollm2, hf_smollm2_in, smollm2_servers):
    weights, tok = smollm2
    engine = connect_engine(weights, tok, smollm2_servers, "shm", dtype=dtype)
    assert engine.dtype == getattr(torch, dtype) and engine.client.data_plane == "shm"
    check_against(engine, hf_smollm2_in(engine.dtype), engine.dtype)
    engine.close()


def test_bfloat16_tee_only_is_close_to_bfloat16_transformers(smollm2, hf_smollm2_in):
    weights, tok = smollm2
    engine = Engine(weights, tok, LocalLinears(weights, torch.bfloat16), dtype=torch.bfloat16)
    check_against(engine, hf_smollm2_in(torch.bfloat16), torch.bfloat16)


def test_the_rule_catches_a_token_outside_the_top_k():
    """Control: a first difference whose token the other side ranks low fails the check."""
    logits = [torch.arange(10.0)] * 2  # token 9 ranks first, token 0 last; top-5 is 5..9
    with pytest.raises(AssertionError, match="top-5"):
        assert_greedy_close([9, 1], logits, [9, 7], logits)  # differs at step 1, where token 1 ranks 9th
    assert assert_greedy_close([9, 8], logits, [9, 7], logits) == 1  # a near-tie: both in each other's top-5
    assert assert_greedy_close([9, 9], logits, [9, 9], logits) == 2


def test_bfloat16_differs_from_float32(smollm2, smollm2_servers):
    """The dtype really reaches the server: bf16 products are not the fp32 ones."""
    weights, tok = smollm2
    engines = [connect_engine(weights, tok, smollm2_servers, "ipc", dtype=d) for d in ("float32", "bfloat16")]
    ids = engines[0].encode("The capital of France is")
    logits = [e.forward(ids, 0, e.new_cache(len(ids))) for e in engines]
    assert 1e-3 < (logits[0] - logits[1]).abs().max() < 5.0
    assert engines[1].hello.dtype == "bfloat16"
    for e in engines:
        e.close()
