"""The trusted side's tokenizer (tokenizers + jinja, no transformers at run time) gives the ids,
texts and chat renderings transformers gives for the same model."""
import os
import subprocess
import sys

import pytest

from conftest import hf_tokenizer
from teegpu.errors import ConfigError
from teegpu.model.tokenizer import ChatTokenizer, load_tokenizer

TEXTS = ["The capital of France is", "", " leading space", "tabs\tand\nnew\n\nlines  ", "Ünïcödé café 東京 🙂",
         "<|im_start|>user\nliteral special tokens<|im_end|>", "def f(x):\n    return x ** 2  # code",
         "a" * 300, "1234567890 3.14159 -42", "<|endoftext|><|im_end|>"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "x2?"}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "<|im_end|> inside a message 東京"}, {"role": "assistant", "content": "ok", "name": None}],
]


@pytest.fixture(scope="module")
def pair(smollm2):
    return smollm2[1], hf_tokenizer()


def test_plain_text_has_the_same_ids_and_text(pair):
    ours, ref = pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert len(ours) == len(ref)
    assert ours.eos_token_id == ref.eos_token_id is not None


def test_every_token_decodes_alone_as_in_transformers(pair):
    ours, ref = pair
    for token in range(0, len(ref), 7):
        assert ours.decode([token]) == ref.decode([token]), token


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chats_render_and_encode_as_in_transformers(pair, generation_prompt):
    ours, ref = pair
    for messages in CHATS:
        text = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        assert ours.render_chat(messages, generation_prompt) == text
        ids = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                      return_dict=True)["input_ids"]
        assert ours.encode_chat(messages, generation_prompt) == list(ids)


TEMPLATE = """{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}
{% set ns.n = ns.n + 1 %}{% generation %}[{{ ns.n }}:{{ m.role }}] {{ m.content | tojson }}{% endgeneration %}
{{ dict(a=1) | tojson }}{% endfor %}{% if add_generation_prompt %}{{ bos_token }}{% endif %}"""


def test_template_features_render_as_in_transformers(pair):
    """Namespaces, loop controls, tojson (no HTML escaping), dict(), generation blocks, special tokens."""
    ours, ref = pair
    ours = ChatTokenizer(ours.tokenizer, TEMPLATE, ours.special_tokens)
    messages = [{"role": "user", "content": "<b>\"quoted\" & 東京</b>"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "ok"}]
    assert ours.render_chat(messages) == ref.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False,
                                                                 add_generation_prompt=True)


@pytest.mark.parametrize("template, reason", [
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ ''.__class__.__mro__ }}", "refused"),
    ("{% set ns = namespace(_secret=1) %}", "underscore"),
])
def test_a_template_that_refuses_is_a_clear_error(smollm2, template, reason):
    tok = ChatTokenizer(smollm2[1].tokenizer, template, smollm2[1].special_tokens)
    with pytest.raises(ConfigError, match=reason):
        tok.encode_chat(CHATS[0])


def test_a_model_without_a_chat_template_says_so(smollm2):
    tok = ChatTokenizer(smollm2[1].tokenizer, None, smollm2[1].special_tokens)
    with pytest.raises(ConfigError, match="no chat template"):
        tok.encode_chat(CHATS[0])


def test_a_hugging_face_directory_gives_the_same_ids(smollm2, tiny_model_dir):
    assert load_tokenizer(str(tiny_model_dir)).encode(TEXTS[4]) == smollm2[1].encode(TEXTS[4])


def test_the_first_load_converts_and_later_loads_need_no_transformers(smollm2, tmp_path):
    """A fresh cache: the first process converts with transformers; the next reads the cache
    without importing it (what makes every trusted process start about 1.5 s sooner)."""
    code = ("import sys; from teegpu.model.tokenizer import load_tokenizer; tok = load_tokenizer(None); "
            "print(tok.encode_chat([{'role': 'user', 'content': 'hi'}])); print('transformers' in sys.modules)")
    env = {**os.environ, "TEEGPU_CACHE_DIR": str(tmp_path)}
    want = str(smollm2[1].encode_chat([{"role": "user", "content": "hi"}]))
    for converts in (True, False):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        assert done.stdout.split("\n")[:2] == [want, str(converts)]
        assert ("converting the tokenizer" in done.stderr) == converts
