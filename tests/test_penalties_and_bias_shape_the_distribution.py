"""logit_bias and the presence/frequency penalties do what OpenAI defines, on the sampler's logits:
logit[j] + bias[j] - frequency * count[j] - presence * (count[j] > 0), counted over the generated
tokens; a bias of -100 bans a token and +100 forces it, greedy or sampled."""
import torch

from teegpu.tee.sampling import adjust, sample


def test_the_formula_on_known_counts():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    got = adjust(logits, ((0, 2.5), (4, -1.0)), presence=0.5, frequency=0.25, generated=[1, 1, 1, 3])
    assert got.tolist() == [3.5, 2.0 - 0.75 - 0.5, 3.0, 4.0 - 0.25 - 0.5, 4.0]
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # the model's logits (and logprobs) stay as they were


def test_nothing_to_apply_is_the_logits_themselves():
    logits = torch.randn(10)
    assert adjust(logits, (), 0.0, 0.0, [1, 2]) is logits
    assert adjust(logits, (), 1.0, 1.0, []) is logits


def test_negative_penalties_encourage_repeats():
    got = adjust(torch.zeros(4), (), presence=-1.0, frequency=-0.5, generated=[2, 2])
    assert got.tolist() == [0.0, 0.0, 2.0, 0.0]


def test_bias_bans_and_forces_tokens_when_sampling():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(1)
    favourite = int(logits.argmax())
    banned = adjust(logits, ((favourite, -100.0),), 0.0, 0.0, [])
    assert all(sample(banned, 1.0, 0, 1.0, rng) != favourite for _ in range(200))
    forced = adjust(logits, ((7, 100.0),), 0.0, 0.0, [])
    assert {sample(forced, 1.0, 0, 1.0, rng) for _ in range(50)} == {7}


def test_penalties_move_probability_away_from_repeated_tokens():
    logits = torch.zeros(3)
    probs = torch.softmax(adjust(logits, (), 0.0, 1.0, [0, 0, 1]), -1)
    assert probs[0] < probs[1] < probs[2]  # two repeats < one repeat < none
