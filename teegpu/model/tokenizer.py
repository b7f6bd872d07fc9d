"""The trusted side's tokenizer: Hugging Face `tokenizers` and the model's jinja chat template.

transformers converts a model's tokenizer once (`load_tokenizer` caches what it made: the live
`tokenizers` state, the chat template and the special tokens); every later start reads those
two files, without importing transformers (about 1.5 s a process). The template
renders as transformers renders it (`apply_chat_template`): the same sandboxed jinja
environment, options, globals and context, then the text is encoded without special tokens;
tests/test_tokenizer_matches_transformers.py holds the two to the same ids.
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from teegpu.errors import ConfigError, ModelLoadError
from teegpu.model.loading import atomic_write, cache_root, gguf_cache_dir, log, resolve_model_path

STATE_FILE, CHAT_FILE = "tokenizer.json", "chat.json"


class ChatTokenizer:
    """Text to token ids and back; `chat_template` is None for a model without one."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, chat_template: str | None, special_tokens: dict[str, str]):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = special_tokens  # bos_token, eos_token, ...: the template sees them by name
        eos = special_tokens.get("eos_token")
        self.eos_token_id = tokenizer.token_to_id(eos) if eos is not None else None

    @classmethod
    def load(cls, folder: Path) -> "ChatTokenizer":
        try:
            chat = json.loads((folder / CHAT_FILE).read_text())
            return cls(tokenizers.Tokenizer.from_file(str(folder / STATE_FILE)), chat["chat_template"],
                       chat["special_tokens"])
        except Exception as e:  # tokenizers raises plain Exception for a broken file
            raise ModelLoadError(f"cannot read the tokenizer cached in {folder}: {e}") from e

    def files(self) -> dict[str, str]:
        """What `load` reads, by file name; CHAT_FILE last (its presence says the folder is whole)."""
        chat = {"chat_template": self.chat_template, "special_tokens": self.special_tokens}
        return {STATE_FILE: self.tokenizer.to_str(), CHAT_FILE: json.dumps(chat, ensure_ascii=False)}

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """A plain prompt's ids, with the special tokens the model adds (its BOS, if any)."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ConfigError("this model has no chat template: send a plain prompt instead of messages")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(**self.special_tokens, messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise ConfigError(f"the model's chat template refused these messages: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The chat's ids: its template writes the special tokens, so none are added."""
        text = self.render_chat(messages, add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @cached_property
    def _template(self) -> jinja2.Template:
        return chat_environment().from_string(self.chat_template)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace without underscore names (no reach into Python internals)."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore names ({name!r})")


class _Dict:
    """`dict(...)` for templates, without handing them the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def chat_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in: a sandbox (templates come with the
    model file), trim_blocks and lstrip_blocks, loop controls, and the same globals and tojson."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env


def load_tokenizer(model: str | os.PathLike | None) -> ChatTokenizer:
    """The trusted side's tokenizer, with the model's chat template (tokenizer.py): converted by
    transformers on the first load, read from the cache after."""
    path = resolve_model_path(model)
    folder = tokenizer_cache_dir(path)
    if not (folder / CHAT_FILE).is_file():
        log(f"first load: converting the tokenizer of {path.name} (cached in {folder} for next time)")
        folder.mkdir(parents=True, exist_ok=True)
        tok = transformers_tokenizer(path)
        tok.save_pretrained(folder)  # transformers' own files too, for `transformers_tokenizer` to read back
        for name, text in converted_tokenizer(tok).files().items():
            atomic_write(folder / name, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return ChatTokenizer.load(folder)


def tokenizer_cache_dir(path: Path) -> Path:
    """Beside the GGUF file's weights; for a HF directory, keyed by its tokenizer files' contents."""
    if not path.is_dir():
        return gguf_cache_dir(path) / "tokenizer"
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return cache_root() / "tokenizers" / h.hexdigest()[:24]


def transformers_tokenizer(path: Path):
    """transformers' tokenizer of a GGUF file or HF directory (the converter; the trusted side
    runs a ChatTokenizer). A GGUF file's is read back from the cache once `load_tokenizer` has
    converted it (converting takes seconds)."""
    from transformers import AutoTokenizer

    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(path)
        cached = tokenizer_cache_dir(path)
        if (cached / CHAT_FILE).is_file():
            return AutoTokenizer.from_pretrained(cached)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises many types for missing/broken files
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {e}") from e


def converted_tokenizer(tok) -> ChatTokenizer:
    """What transformers made of the tokenizer, as it stands after loading (its post-processor
    included), with its default chat template, or None where the model has none."""
    if tok.clean_up_tokenization_spaces and type(tok.backend_tokenizer.model).__name__ != "BPE":
        raise ModelLoadError("the tokenizer cleans up spaces after decoding, which teegpu does not: "
                             "LLaMA-family tokenizers are BPE and never do")
    try:
        template = tok.get_chat_template()
    except ValueError:  # the model has no chat template
        template = None
    state = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
    return ChatTokenizer(state, template, dict(tok.special_tokens_map))
