"""Shared fixtures: the real SmolLM2 model, its HF reference, tiny random LLaMAs, servers."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from teegpu.model.loading import load_weights, resolve_model_path
from teegpu.model.tokenizer import load_tokenizer, transformers_tokenizer
from teegpu.model.reference import transformers_model, with_parameters_in
from teegpu.config import ServerConfig
from teegpu.server_process import ServerProcess, private_endpoint
from teegpu.tee.engine import Engine

TRANSPORTS = {"tcp": lambda: "tcp://127.0.0.1:*", "ipc": private_endpoint}
# how a test names a variant: the endpoint's transport, or "shm" (ipc for the header, /dev/shm for tensors)
VARIANTS = ("tcp", "ipc", "shm")


def connect_engine(weights, tokenizer, servers, variant: str, dtype: str = "float32", privacy: str = "plain",
                   **kw) -> Engine:
    """An engine on the session's loaded model, talking to the shared server of that variant."""
    endpoint = servers("ipc" if variant == "shm" else variant, dtype, privacy)
    kw["privacy"] = privacy
    return Engine.connect(weights, tokenizer, endpoint, data_plane="shm" if variant == "shm" else "socket", **kw)


@pytest.fixture(scope="session")
def smollm2():
    """(weights, tokenizer) of the real default model, loaded the trusted side's way."""
    return load_weights(None), load_tokenizer(None)


@pytest.fixture(scope="session")
def hf_smollm2():
    """The reference: transformers' LlamaForCausalLM loaded from the same GGUF file."""
    return transformers_model(None)


@pytest.fixture(scope="session")
def hf_smollm2_in(hf_smollm2):
    """transformers' model from the same GGUF in a given dtype (transformers_model's way: the
    float32 load's parameters cast), made on first use."""
    models = {}

    def get(dtype: torch.dtype):
        if dtype not in models:
            models[dtype] = with_parameters_in(copy.deepcopy(hf_smollm2), dtype)
        return models[dtype]

    return get


def hf_generate(model, ids: list[int], steps: int) -> list[int]:
    """Greedy tokens from transformers' own generate loop with its KV cache."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="session")
def smollm2_servers():
    """One real server process per transport, started on first use."""
    procs: dict[str, ServerProcess] = {}

    def get(transport: str, dtype: str = "float32", privacy: str = "plain") -> str:
        key = f"{transport}-{dtype}-{privacy}"
        if key not in procs:
            procs[key] = ServerProcess(ServerConfig(endpoint=TRANSPORTS[transport](), dtype=dtype, privacy=privacy))
        return procs[key].wait_ready()

    yield get
    for p in procs.values():
        p.stop()


_hf_greedy_memo: dict = {}


def hf_greedy(model, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Reference greedy decoding by full recomputation; returns (new ids, logits of every position)."""
    key = (id(model), tuple(ids), steps)
    if key not in _hf_greedy_memo:
        _hf_greedy_memo[key] = _hf_greedy(model, ids, steps)
    return _hf_greedy_memo[key]


def _hf_greedy(model, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens decoded on transformers' own KV cache, as `generate` decodes; then the logits
    of every position from one forward over the whole sequence."""
    seq = list(ids)
    with torch.inference_mode():
        out = model(torch.tensor([seq]), use_cache=True)
        for i in range(steps):
            seq.append(int(out.logits[0, -1].argmax()))
            if i + 1 < steps:
                out = model(torch.tensor([seq[-1:]]), past_key_values=out.past_key_values, use_cache=True)
        logits = model(torch.tensor([seq])).logits[0]
    return seq[len(ids):], logits


@functools.cache
def hf_tokenizer():
    """transformers' SmolLM2 tokenizer: what a Hugging Face directory holds."""
    return transformers_tokenizer(resolve_model_path(None))


def save_tiny_llama(path, seed: int, **overrides):
    """A random tiny LLaMA in Hugging Face format, with the real tokenizer (transformers' files) beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = hf_tokenizer()
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               initializer_range=0.1, tie_word_embeddings=False)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


API_KEY = "test-key"
SERVED_MODEL = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="session")
def openai_api():
    """One real `teegpu api` process (its private GPU server behind it) for the API's tests, with
    speculative decoding on: every API test also checks that drafts change no answer."""
    from api_process import ApiProcess

    proc = ApiProcess("--api-key", API_KEY, "--max-batch", "8", "--prefill-chunk", "64", "--speculative", "ngram")
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path, seed=1)
    return path


@pytest.fixture()
def tiny_server(tiny_model_dir):
    """A real server process on the tiny model, fresh for each test (tests may kill it)."""
    proc = ServerProcess(ServerConfig(model=str(tiny_model_dir), endpoint="tcp://127.0.0.1:*"))
    proc.wait_ready()
    yield proc
    proc.stop()
