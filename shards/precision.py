"""dtype policy and bitsandbytes quantization of a span's linear layers."""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from shards.errors import UnsupportedPrecisionError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTS = ("none", "int8", "nf4")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (16-bit matmuls are slow there) and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        result = dtype
    elif dtype == "auto":
        result = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    elif dtype in DTYPES:
        result = DTYPES[dtype]
    else:
        raise UnsupportedPrecisionError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    check_dtype(result, device)
    return result


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Run a tiny matmul so that an unsupported dtype fails now, with advice, not mid-request."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UnsupportedPrecisionError(f"{torch.cuda.get_device_name(device)} has no bfloat16: use --dtype float16")
    try:
        x = torch.ones(2, 2, dtype=dtype, device=device)
        (x @ x).sum().item()
    except (RuntimeError, TypeError) as e:
        raise UnsupportedPrecisionError(f"{dtype} does not run on {device} ({e}); use --dtype float32") from e


def quantize_linears(module: nn.Module, quant: str, compute_dtype: torch.dtype) -> nn.Module:
    """Replace every nn.Linear inside ``module`` by its bitsandbytes int8 or nf4 counterpart (in place).

    Weights are quantized when the module is next moved with ``.to(device)``.
    """
    if quant == "none":
        return module
    bnb = _import_bitsandbytes(quant)
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            weight = child.weight.data
            if quant == "int8":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=6.0)
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=compute_dtype, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=False)
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, new)
        else:
            quantize_linears(child, quant, compute_dtype)
    return module


def check_quant(quant: str, dtype: torch.dtype, device: torch.device) -> None:
    """Quantize and run one small layer so that a missing backend fails at start-up, with advice."""
    if quant == "none":
        return
    if quant not in QUANTS:
        raise UnsupportedPrecisionError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    layer = nn.Sequential(nn.Linear(64, 64, bias=False).to(dtype))
    try:
        quantize_linears(layer, quant, dtype).to(device)
        layer(torch.ones(1, 64, dtype=dtype, device=device)).sum().item()
    except Exception as e:  # bitsandbytes raises many types when a backend is missing
        raise UnsupportedPrecisionError(
            f"{quant} quantization does not run on {device} with bitsandbytes ({type(e).__name__}: {e}); "
            f"use --quant none or install a bitsandbytes build for this device") from e


def _import_bitsandbytes(quant: str):
    # bitsandbytes logs about optional CPU kernels on import and warns at every int8 matmul of float32
    # inputs (they are computed in float16, as in transformers); neither needs the user's attention
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    try:
        import bitsandbytes
    except ImportError as e:
        raise UnsupportedPrecisionError(f"{quant} needs bitsandbytes: pip install bitsandbytes ({e})") from e
    return bitsandbytes
