"""Building client requests and reading server responses."""
from __future__ import annotations

import torch
from hivemind.proto.runtime_pb2 import CompressionType, ExpertRequest, ExpertResponse

from swarm.protocol import pack_metadata, pack_tensors, unpack_metadata, unpack_tensors, wire_compression

MAX_RESPONSE_NUMEL = 1 << 30


def span_request(tensors: dict[str, torch.Tensor | None], meta: dict, *, exact: bool) -> ExpertRequest:
    """``tensors`` in wire order (hidden first); None values are left out and not named. LoRA weights go
    uncompressed: the server keys them by the hash of exactly these bytes, and training needs them exact."""
    present = {name: t for name, t in tensors.items() if t is not None}
    compression = wire_compression(present["hidden"].dtype, exact)
    packed = [pack_tensors([t], CompressionType.NONE if name == "lora" else compression)[0]
              for name, t in present.items()]
    return ExpertRequest(tensors=packed, metadata=pack_metadata({**meta, "tensors": list(present)}))


def read_output(response: ExpertResponse, like: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The response's one tensor, checked against the shape it must have, on ``like``'s device and dtype."""
    (output,), meta = read_outputs(response, [like])
    return output, meta


def read_outputs(response: ExpertResponse, likes: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """The response's tensors, one per entry of ``likes``, each checked against its shape."""
    outputs = unpack_tensors(response.tensors, MAX_RESPONSE_NUMEL)
    if len(outputs) != len(likes):
        raise ValueError(f"server returned {len(outputs)} tensors, expected {len(likes)}")
    for output, like in zip(outputs, likes):
        if output.shape != like.shape:
            raise ValueError(f"server returned shape {list(output.shape)}, expected {list(like.shape)}")
    return [o.to(device=l.device, dtype=l.dtype) for o, l in zip(outputs, likes)], unpack_metadata(response.metadata)


def block_slice(block_tensors: dict, start: int, end: int, offset: int = 0) -> dict:
    """The rows of blocks [start, end) of tensors whose first dimension is blocks [offset, ...)."""
    return {name: None if t is None else t[start - offset:end - offset].contiguous() for name, t in block_tensors.items()}


def wire_round(tensor: torch.Tensor, exact: bool) -> torch.Tensor:
    """The values of ``tensor`` as they arrive after crossing the wire (16-bit unless exact)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.float32 and not exact:
        return tensor.clamp(torch.finfo(torch.float16).min, torch.finfo(torch.float16).max).half().float()
    return tensor.float()


def optional_inputs(batch: int, past: int, length: int, attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """Position ids and attention mask, left out when they say what the server assumes anyway (no padding)."""
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    default_positions = torch.arange(past, past + length).expand(batch, -1)
    if position_ids is not None and attention_mask is None and torch.equal(position_ids.cpu(), default_positions):
        position_ids = None
    if position_ids is not None:
        position_ids = position_ids.long().cpu().expand(batch, -1).contiguous()
    if attention_mask is not None:
        attention_mask = attention_mask.long().cpu()
    return {"position_ids": position_ids, "attention_mask": attention_mask}
