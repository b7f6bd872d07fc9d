"""The monolithic reference: transformers' LlamaForCausalLM from the same model file.

Tests and benchmarks compare against it; the runtime never imports it.
"""
from __future__ import annotations

import os

import torch

from teegpu.model.loading import resolve_model_path


def transformers_model(model: str | os.PathLike | None, dtype: torch.dtype = torch.float32):
    """The model in one process. In bfloat16/float16 the parameters are cast after a float32
    load and the buffers (rotary inv_freq) stay float32, as transformers has them when it
    loads a checkpoint stored in that dtype (a GGUF loaded straight in bf16 keeps packed
    weights and multiplies in float32, which is not a bf16 model)."""
    from transformers import LlamaForCausalLM

    path = resolve_model_path(model)
    if path.is_dir():
        hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        hf = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return with_parameters_in(hf, dtype)


def with_parameters_in(hf, dtype: torch.dtype):
    """A float32 transformers model with its parameters cast to `dtype` (buffers kept), in place."""
    for p in hf.parameters():
        p.data = p.data.to(dtype)
    return hf.eval()
