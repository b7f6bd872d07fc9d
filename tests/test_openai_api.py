"""`teegpu api` as its users see it: the official openai client and raw HTTP against a real
API process (the real SmolLM2, a real private GPU server behind it), many users at once."""
import threading
import time

import httpx
import openai
import pytest

from conftest import API_KEY as KEY, SERVED_MODEL as MODEL
from openai_schema import validate
QUESTIONS = ["What is the capital of France?", "Name three fruits.", "Write a haiku about rain.",
             "What is 2 + 2?", "Say hello in Spanish.", "Why is the sky blue?", "Give me a colour.",
             "Describe a cat in one sentence."]


@pytest.fixture(scope="module")
def api(openai_api):
    return openai_api


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(client, question: str, n: int, **kw):
    """A chat completion, validated against OpenAI's schema (a stream: by streamed_text)."""
    got = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                         max_tokens=n, temperature=0, **kw)
    if not kw.get("stream"):
        validate("CreateChatCompletionResponse", got.model_dump(exclude_unset=True))
    return got


def streamed_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    for c in chunks:
        validate("CreateChatCompletionStreamResponse", c.model_dump(exclude_unset=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_lists_the_served_model(client):
    validate("ListModelsResponse", client.models.list().model_dump(exclude_unset=True))
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert len(models[0].model_extra["fingerprint"]) == 64 and models[0].model_extra["privacy"] == "plain"


def test_chat_whole_and_streamed_agree(client):
    whole = chat(client, QUESTIONS[0], 24)
    assert whole.object == "chat.completion" and whole.model == MODEL
    assert whole.system_fingerprint.startswith("fp_") and whole.system_fingerprint.endswith("_plain")
    text = whole.choices[0].message.content
    assert "Paris" in text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    streamed, chunks = streamed_text(chat(client, QUESTIONS[0], 24, stream=True,
                                          stream_options={"include_usage": True}))
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]  # the usage chunk comes last (the same prompt again: now from the prefix cache)
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert last.usage.prompt_tokens_details.cached_tokens > whole.usage.prompt_tokens_details.cached_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_completions_whole_and_streamed_agree(client):
    whole = client.completions.create(model=MODEL, prompt="The three primary colours are", max_tokens=12,
                                      temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    stream = list(client.completions.create(model=MODEL, prompt="The three primary colours are", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text
    for part in [whole, *stream]:
        validate("CreateCompletionResponse", part.model_dump(exclude_unset=True))


def test_stop_string_ends_the_text_before_it(client):
    full = chat(client, QUESTIONS[5], 40).choices[0].message.content
    words = full.split()
    stop = " " + words[len(words) // 2]  # a word from the middle of the answer
    cut = full[:full.index(stop)]
    got = chat(client, QUESTIONS[5], 40, stop=[stop, "@@never@@"])
    assert got.choices[0].message.content == cut and got.choices[0].finish_reason == "stop"
    streamed, _ = streamed_text(chat(client, QUESTIONS[5], 40, stop=stop, stream=True))
    assert streamed == cut


def test_chat_logprobs(client):
    got = chat(client, QUESTIONS[3], 6, logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    # the end-of-sequence token counts in usage, but is not listed (its text is not the answer's)
    assert len(content) == got.usage.completion_tokens - (got.choices[0].finish_reason == "stop")
    assert "".join(t.token for t in content) == got.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.logprob == pytest.approx(max(a.logprob for a in t.top_logprobs))  # greedy takes the top one
        assert bytes(t.bytes).decode() == t.token


def test_completion_logprobs(client):
    got = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4, temperature=0, logprobs=2)
    validate("CreateCompletionResponse", got.model_dump(exclude_unset=True))
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == got.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)


def test_seeded_sampling_repeats(client):
    a, b = (client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a joke."}],
                                           max_tokens=12, temperature=0.8, seed=42) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_errors_the_client_raises(api, client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        chat(client, "hi", 0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    wrong = openai.OpenAI(base_url=api.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.BadRequestError, match="context window") as e:
        chat(client, "hi", 9000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="json_object") as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_object"})
    assert e.value.param == "response_format"
    assert "Paris" in chat(client, QUESTIONS[0], 12).choices[0].message.content  # still serving


def test_concurrent_streams_equal_their_solo_answers(api, client):
    """Eight streams with different prompts and lengths, starting at different times, while a ninth
    client walks away mid-stream: each text is its solo greedy answer."""
    lengths = [8 + 4 * i for i in range(8)]
    solo = [chat(client, q, n).choices[0].message.content for q, n in zip(QUESTIONS, lengths)]
    texts: dict[int, str] = {}

    def run(i: int) -> None:
        time.sleep(0.15 * i)
        texts[i], _ = streamed_text(chat(client, QUESTIONS[i], lengths[i], stream=True))

    def walk_away() -> None:
        stream = chat(client, "Write a long essay about rivers.", 200, stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                stream.close()
                return

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)] + [threading.Thread(target=walk_away)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [texts.get(i) for i in range(8)] == solo
    metrics = httpx.get(api.url + "/metrics").text
    assert "teegpu_sequences_running 0.0" in metrics or wait_for_idle(api)


def wait_for_idle(api, timeout_s: float = 10) -> bool:
    """True once no sequence runs (the walked-away one is cancelled at the next step)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "teegpu_sequences_running 0.0" in httpx.get(api.url + "/metrics").text:
            return True
        time.sleep(0.2)
    return False


AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
BAD_BODIES = [
    ("broken json", b'{"model": "x", "messages": [', 400, None),
    ("not an object", b"[1, 2, 3]", 400, None),
    ("missing messages", {"model": MODEL}, 400, "messages"),
    ("messages of the wrong type", {**GOOD, "messages": "hi"}, 400, "messages"),
    ("unknown role", {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("image part", {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0"),
    ("content a number", {**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("max_tokens a string", {**GOOD, "max_tokens": "5"}, 400, "max_tokens"),
    ("negative max_tokens", {**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ("temperature out of range", {**GOOD, "temperature": 7}, 400, "temperature"),
    ("negative top_k", {**GOOD, "top_k": -2}, 400, "top_k"),
    ("seed beyond 64 bits", {**GOOD, "seed": 1 << 70}, 400, "seed"),
    ("five stop strings", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("unknown field", {**GOOD, "frobnicate": True}, 400, "frobnicate"),
    ("penalty out of range", {**GOOD, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("tools", {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("unknown model", {**GOOD, "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize("case,body,status,param", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_request_gets_its_status_and_error_object(api, case, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(api.url + "/v1/chat/completions", headers=AUTH, timeout=60, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    validate("ErrorResponse", r.json())
    assert httpx.post(api.url + "/v1/chat/completions", headers=AUTH, json=GOOD, timeout=60).status_code == 200


def test_huge_body_is_refused_before_it_is_read(api):
    r = httpx.post(api.url + "/v1/completions", headers=AUTH, timeout=60,
                   content=b'{"model": "x", "prompt": "' + b"x" * (2 << 20) + b'"}')
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]


@pytest.mark.parametrize("method,path,status", [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                                ("POST", "/v1/models", 405)])
def test_unknown_paths_and_methods(api, method, path, status):
    r = httpx.request(method, api.url + path, headers=AUTH)
    assert r.status_code == status and r.json()["error"]["message"]


def test_health_and_metrics(api, client):
    assert httpx.get(api.url + "/health").json() == {"status": "ok", "attestation": "none"}
    chat(client, "Hi", 3)
    httpx.post(api.url + "/v1/chat/completions", headers=AUTH, json={**GOOD, "max_tokens": 0})
    text = httpx.get(api.url + "/metrics").text
    for name in ("teegpu_requests_total", "teegpu_prompt_tokens_total", "teegpu_completion_tokens_total",
                 "teegpu_sequences_running", "teegpu_sequences_waiting", "teegpu_time_to_first_token_seconds",
                 "teegpu_inter_token_latency_seconds", "teegpu_step_seconds", "teegpu_rpc_seconds_per_step",
                 "teegpu_integrity_failures_total"):
        assert name in text, name
    assert 'teegpu_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'status="400"' in text  # the bad requests above were counted
