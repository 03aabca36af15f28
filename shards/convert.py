"""Checkpoints from other formats: a GGUF file (llama.cpp's) becomes an ordinary safetensors checkpoint with its
tokenizer, by transformers' own GGUF reader (which dequantizes the weights; it needs the `gguf` package)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from shards.precision import DTYPES


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write the model and tokenizer of ``gguf_path`` to ``out_dir`` (``save_pretrained``), weights in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=DTYPES[dtype])
    # the weights are dequantized already: what is left of the GGUF quantizer would only refuse to save them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def convert_dtype(source: str | os.PathLike, out_dir: str | os.PathLike, dtype: str) -> Path:
    """A copy of a checkpoint with its weights (and config.dtype) in ``dtype``, tokenizer included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(out_dir)
    return Path(out_dir)


def answer(checkpoint: str | os.PathLike, question: str, max_new_tokens: int = 24,
           dtype: torch.dtype = torch.float32) -> str:
    """The greedy answer of a chat checkpoint to one question, run locally by transformers (a sanity check)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
