"""What `cocoon api` reads and writes: OpenAI's request bodies (validated by pydantic, bounded before they cost
anything), its error objects, and its completion and chunk records."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import torch
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator

MAX_STOPS, MAX_STOP_CHARS = 4, 64


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]  # OpenAI's own form: a list of parts (only text ones here)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class Sampling(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None  # OpenAI's limits: up to 4 strings (transformers builds a table per string)
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    # what clients send with neutral values is accepted; anything else they ask is refused, never ignored
    tools: list | None = None
    tool_choice: str | dict | None = None
    logprobs: bool | int | None = None  # chat: true/false; completions: how many alternatives (0-5)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def at_most_four_short_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS or any(len(text) > MAX_STOP_CHARS for text in stops):
            raise ValueError(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters each")
        return stop

    def alternatives(self) -> int | None:
        """None: no logprobs asked; otherwise how many of the likeliest tokens to list beside each chosen one."""
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.logprobs is True:
            return self.top_logprobs or 0
        if not 0 <= self.logprobs <= 20:
            raise APIError(400, f"logprobs must lie in [0, 20], got {self.logprobs}", param="logprobs")
        return int(self.logprobs)

    def refuse_unsupported(self) -> None:
        unsupported = {"tools": bool(self.tools), "tool_choice": self.tool_choice not in (None, "none", "auto"),
                       "logit_bias": bool(self.logit_bias)}
        for name, asked in unsupported.items():
            if asked:
                raise APIError(400, f"{name} is not supported by this server (cocoon api): leave it out", param=name)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    predictions: tuple[int, int] | None = None  # speculative decoding: drafted tokens (accepted, rejected)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class TokenLogprob:
    """One generated token, its log-probability under the model (before sampling's changes), and the likeliest."""
    token: str
    logprob: float
    top: list[tuple[str, float]]

    @staticmethod
    def of(tokenizer, new_ids: list[int], logits: tuple[torch.Tensor, ...], alternatives: int) -> list:
        found = []
        for token_id, step_logits in zip(new_ids, logits):
            logprobs = torch.log_softmax(step_logits[0].float(), dim=-1)
            top = torch.topk(logprobs, alternatives) if alternatives else None
            found.append(TokenLogprob(tokenizer.decode([token_id]), logprobs[token_id].item(),
                                      [(tokenizer.decode([i]), v) for i, v in
                                       zip(top.indices.tolist(), top.values.tolist())] if top else []))
        return found

    def chat(self) -> dict:
        entry = lambda token, logprob: {"token": token, "logprob": logprob, "bytes": list(token.encode())}
        return {**entry(self.token, self.logprob), "top_logprobs": [entry(t, lp) for t, lp in self.top]}


def usage(result: Result) -> dict:
    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
             "total_tokens": result.prompt_tokens + result.completion_tokens}
    if result.predictions is not None:  # OpenAI's fields for predicted outputs
        accepted, rejected = result.predictions
        usage["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                              "rejected_prediction_tokens": rejected}
    return usage


def logprobs(result: Result | None, chat: bool) -> dict | None:
    """OpenAI's two forms: chat's list of entries, completions' parallel lists."""
    if result is None or result.logprobs is None:
        return None
    if chat:
        return {"content": [entry.chat() for entry in result.logprobs], "refusal": None}
    offsets, at = [], 0
    for entry in result.logprobs:
        offsets.append(at)
        at += len(entry.token)
    return {"tokens": [e.token for e in result.logprobs], "token_logprobs": [e.logprob for e in result.logprobs],
            "top_logprobs": [dict(e.top) for e in result.logprobs], "text_offset": offsets}


def completion(model: str, identity: str, created: int, chat: bool, result: Result) -> dict:
    choice = {"index": 0, "finish_reason": result.finish_reason, "logprobs": logprobs(result, chat)}
    if chat:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice.update(text=result.text)
    return {"id": identity, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": usage(result)}


def chunk(model: str, identity: str, created: int, chat: bool, delta, finish_reason: str | None = None,
           result: Result | None = None) -> dict:
    choice = {"index": 0, "finish_reason": finish_reason, "logprobs": logprobs(result, chat)}  # (with the last)
    if chat:
        choice["delta"] = delta
    else:
        choice.update(text=delta)
    chunk = {"id": identity, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
             "model": model, "choices": [choice]}
    if result is not None:
        chunk["usage"] = usage(result)
    return chunk


def event(data) -> str:
    return f"data: {data.decode() if isinstance(data, bytes) else json.dumps(data)}\n\n"
