"""What OpenAI's published schema allows is served or refused on purpose, as docs/api.md says, and
every response object, stream chunk and error validates against that schema (vendored in
tests/data/openai-openapi). Prompts in all four forms through the sync and async openai clients;
token ids give the text prompt's tokens; bad input gets its status and names the field, and the
server answers the next request."""
import asyncio
import json
import re
from pathlib import Path

import httpx
import openai
import pytest

from conftest import API_KEY, SERVED_MODEL as MODEL
from openai_schema import request_fields, validate

AUTH = {"Authorization": f"Bearer {API_KEY}"}
DOC = Path(__file__).parents[1] / "docs" / "api.md"
ROUTES = {"chat": ("/v1/chat/completions", "CreateChatCompletionRequest", "CreateChatCompletionResponse",
                   "CreateChatCompletionStreamResponse"),
          "completions": ("/v1/completions", "CreateCompletionRequest", "CreateCompletionResponse",
                          "CreateCompletionResponse")}
BASE = {"chat": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0},
        "completions": {"model": MODEL, "prompt": "One, two,", "max_tokens": 3, "temperature": 0}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
# a value of each field that is not its default (and, for a refused field, its neutral value too)
EXAMPLES = {
    "model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 2, "max_completion_tokens": 2, "temperature": 0.7, "top_p": 0.9,
    "n": 2, "stream": True, "stream_options": {"include_usage": True}, "stop": ["\n", "."], "seed": -5,
    "logprobs": {"chat": True, "completions": 2}, "top_logprobs": 2, "echo": True, "logit_bias": {"42": 3},
    "presence_penalty": 0.5, "frequency_penalty": -0.5, "user": "u1", "safety_identifier": "s1",
    "metadata": {"k": "v"}, "prompt_cache_key": "k", "prompt_cache_retention": "24h",
    "prompt_cache_options": {"ttl": "30m"}, "parallel_tool_calls": False,
    "store": (True, False), "best_of": (3, 1), "suffix": ("x", ""), "response_format": ({"type": "json_object"},
                                                                                           {"type": "text"}),
    "tools": ([TOOL], []), "tool_choice": ("required", "none"), "functions": ([{"name": "f"}], []),
    "function_call": ({"name": "f"}, "none"), "service_tier": ("flex", "auto"), "modalities": (["text", "audio"],
                                                                                               ["text"]),
    "audio": ({"voice": "alloy", "format": "wav"}, None), "prediction": ({"type": "content", "content": "x"}, None),
    "reasoning_effort": ("low", None), "verbosity": ("low", None), "web_search_options": ({}, None),
    "moderation": ({"model": "omni-moderation-latest"}, None),
}
NEEDS = {"stream_options": {"stream": True}, "top_logprobs": {"logprobs": True}}


def doc_table() -> dict[str, dict]:
    """docs/api.md's request table: field -> {chat, completions, here}."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `(\w+)` \| (yes|-) \| (yes|-) \| ([a-z ]+?) \|", line)
        if m:
            rows[m[1]] = {"chat": m[2] == "yes", "completions": m[3] == "yes", "here": m[4]}
    return rows


def post(api, kind: str, body: dict, **kw) -> tuple[httpx.Response, list]:
    """POST a request; the response and, for a stream, its chunks (each validated), else []."""
    path, _, whole, chunk = ROUTES[kind]
    r = httpx.post(api.url + path, headers=AUTH, timeout=120, json=body, **kw)
    if r.status_code != 200:
        validate("ErrorResponse", r.json())
        return r, []
    if not r.headers["content-type"].startswith("text/event-stream"):
        validate(whole, r.json())
        return r, []
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        validate(chunk, c)
    return r, chunks


def test_the_table_lists_every_field_of_both_schemas():
    table = doc_table()
    for kind, (_, request, _, _) in ROUTES.items():
        assert set(request_fields(request)) == {f for f, row in table.items() if row[kind]}, kind
    assert set(EXAMPLES) == set(table)


CASES = [(kind, field) for kind in ROUTES for field in request_fields(ROUTES[kind][1])]


@pytest.mark.parametrize("kind,field", CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_each_field_is_served_or_refused_as_documented(openai_api, kind, field):
    here = doc_table()[field]["here"]
    example = EXAMPLES[field]
    value, neutral = example if here == "refused" else (example, None)
    value = value[kind] if isinstance(value, dict) and set(value) == {"chat", "completions"} else value
    body = {**BASE[kind], **NEEDS.get(field, {}), field: value}
    validate(ROUTES[kind][1], body)  # the example is a request OpenAI's schema allows
    r, _ = post(openai_api, kind, body)
    if here == "refused":
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        r, _ = post(openai_api, kind, {**BASE[kind], field: neutral})
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def ids(smollm2):
    tok = smollm2[1]
    return [tok.encode("One, two,"), tok.encode("Red, green,")]


def prompt_forms(ids) -> dict:
    return {"string": "One, two,", "strings": ["One, two,", "Red, green,"], "ids": ids[0], "id arrays": ids}


async def async_parts(url: str, forms: dict, kw: dict) -> dict[str, list[list]]:
    """Each form's answers from the async client (two at once), as lists of response parts."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as aio:
        async def one(prompt) -> list:
            answer = await aio.completions.create(prompt=prompt, **kw)
            return [part async for part in answer] if kw["stream"] else [answer]

        return {form: list(await asyncio.gather(one(p), one(p))) for form, p in forms.items()}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_every_prompt_form_through_both_clients(openai_api, ids, stream):
    """Token ids give the text prompt's tokens; an array gives one choice per prompt, in order."""
    sync = openai.OpenAI(base_url=openai_api.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    kw = dict(model=MODEL, max_tokens=5, temperature=0, stream=stream)
    want = [sync.completions.create(prompt=p, **{**kw, "stream": False}).choices[0].text
            for p in ("One, two,", "Red, green,")]
    forms = prompt_forms(ids)
    from_async = asyncio.run(async_parts(openai_api.url, forms, kw))
    for form, prompt in forms.items():
        answer = sync.completions.create(prompt=prompt, **kw)
        for parts in [list(answer) if stream else [answer], *from_async[form]]:
            texts = {}
            for part in parts:
                validate("CreateCompletionResponse", part.model_dump(exclude_unset=True))
                for c in part.choices:
                    texts[c.index] = texts.get(c.index, "") + c.text
            assert [texts[i] for i in sorted(texts)] == want[:len(texts)] and len(texts) == (
                2 if form in ("strings", "id arrays") else 1), form


def test_chat_choices_and_usage(openai_api):
    body = {**BASE["chat"], "n": 3, "temperature": 0.9, "seed": 11, "max_tokens": 8}
    a, b = (post(openai_api, "chat", body)[0].json() for _ in range(2))
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]
    assert len({c["message"]["content"] for c in a["choices"]}) > 1  # choice i samples with seed + i
    one = post(openai_api, "chat", {**body, "n": 1})[0].json()
    assert a["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt counts once
    _, chunks = post(openai_api, "chat", {**body, "stream": True, "stream_options": {"include_usage": True}})
    streamed = {}
    for c in chunks[:-1]:
        for ch in c["choices"]:
            streamed[ch["index"]] = streamed.get(ch["index"], "") + (ch["delta"].get("content") or "")
    assert [streamed[i] for i in range(3)] == [c["message"]["content"] for c in a["choices"]]
    assert chunks[-1]["usage"] == a["usage"]


def test_echo_gives_the_prompt_and_its_logprobs(openai_api, ids):
    prompt = "One, two,"
    got = post(openai_api, "completions", {**BASE["completions"], "prompt": prompt, "echo": True, "logprobs": 1,
                                           "max_tokens": 2})[0].json()["choices"][0]
    lp, n = got["logprobs"], len(ids[0])
    assert got["text"].startswith(prompt) and "".join(lp["tokens"]) == got["text"]
    assert len(lp["tokens"]) == n + 2 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x < 0 for x in lp["token_logprobs"][1:]) and lp["text_offset"][n] == len(prompt)
    for token, lp_, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[token] == lp_ and len(top) <= 2  # up to logprobs + 1, the token itself always there
    only = post(openai_api, "completions", {**BASE["completions"], "prompt": ids[0], "echo": True, "logprobs": 0,
                                            "max_tokens": 0})[0].json()
    assert only["choices"][0]["text"] == prompt and only["usage"]["completion_tokens"] == 0
    assert only["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:n]
    _, chunks = post(openai_api, "completions", {**BASE["completions"], "prompt": prompt, "echo": True,
                                                 "max_tokens": 2, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == got["text"]


def test_logit_bias_forces_and_an_end_token_counts(openai_api, smollm2):
    tok = smollm2[1]
    forced = tok.encode("banana")[0]
    got = post(openai_api, "completions", {**BASE["completions"], "logit_bias": {str(forced): 100}, "logprobs": 0,
                                           "max_tokens": 4})[0].json()["choices"][0]
    assert got["logprobs"]["tokens"] == [tok.decode([forced])] * 4
    eos = tok.eos_token_id
    ended = post(openai_api, "chat", {**BASE["chat"], "logit_bias": {str(eos): 100}})[0].json()
    assert ended["choices"][0]["message"]["content"] == "" and ended["choices"][0]["finish_reason"] == "stop"
    assert ended["usage"]["completion_tokens"] == 1  # the generated end-of-sequence token counts


TEXT_BAD = [
    ("text/plain body", b'{"model": "m", "prompt": "hi"}', {"Content-Type": "text/plain"}, 415, None),
    ("form body", b"model=m&prompt=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
    ("broken json", b'{"model": ', {"Content-Type": "application/json"}, 400, None),
]
FIELD_BAD = [
    ("prompt a number", {"prompt": 5}, "prompt"), ("prompt mixed", {"prompt": ["a", [1]]}, "prompt"),
    ("prompt empty array", {"prompt": []}, "prompt"), ("prompt null", {"prompt": None}, "prompt"),
    ("token id past the vocabulary", {"prompt": [1, 99999]}, "prompt"), ("negative id", {"prompt": [-1]}, "prompt"),
    ("logprobs 6", {"logprobs": 6}, "logprobs"), ("n 0", {"n": 0}, "n"), ("n 129", {"n": 129}, "n"),
    ("more choices than places", {"n": 100}, "n"), ("seed 2^63", {"seed": 1 << 63}, "seed"),
    ("seed below -2^63", {"seed": -(1 << 63) - 1}, "seed"), ("bias key", {"logit_bias": {"a": 1}}, "logit_bias"),
    ("bias value", {"logit_bias": {"1": 101}}, "logit_bias"), ("bias id", {"logit_bias": {"99999": 1}}, "logit_bias"),
    ("penalty", {"frequency_penalty": -3}, "frequency_penalty"), ("max_tokens 0", {"max_tokens": 0}, "max_tokens"),
    ("stream_options alone", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("temperature a string", {"temperature": "hot"}, "temperature"), ("echo a string", {"echo": "yes"}, "echo"),
]


@pytest.mark.parametrize("case,content,headers,status,param", TEXT_BAD, ids=[c[0] for c in TEXT_BAD])
def test_bad_bodies(openai_api, case, content, headers, status, param):
    r = httpx.post(openai_api.url + "/v1/completions", headers={**AUTH, **headers}, content=content, timeout=60)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    validate("ErrorResponse", r.json())
    assert post(openai_api, "completions", BASE["completions"])[0].status_code == 200


@pytest.mark.parametrize("case,fields,param", FIELD_BAD, ids=[c[0] for c in FIELD_BAD])
def test_bad_fields_are_named(openai_api, case, fields, param):
    r, _ = post(openai_api, "completions", {**BASE["completions"], **fields})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert post(openai_api, "completions", BASE["completions"])[0].status_code == 200


def test_a_body_without_content_type_is_read_as_json(openai_api):
    r = httpx.post(openai_api.url + "/v1/completions", headers=AUTH, content=json.dumps(BASE["completions"]))
    assert r.status_code == 200, r.text


def test_models_validate(openai_api):
    listed = httpx.get(openai_api.url + "/v1/models", headers=AUTH).json()
    validate("ListModelsResponse", listed)
    validate("Model", httpx.get(openai_api.url + f"/v1/models/{MODEL}", headers=AUTH).json())
    missing = httpx.get(openai_api.url + "/v1/models/gpt-9", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    validate("ErrorResponse", missing.json())
