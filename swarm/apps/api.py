"""`cocoon api`: the swarm behind an OpenAI-compatible HTTP API (FastAPI + uvicorn), so that chat front-ends,
LangChain, IDE assistants and the `openai` client work unchanged.

    GET  /health                 {"status": "ok", ...}
    GET  /v1/models              the one model this front serves
    POST /v1/chat/completions    messages through the tokenizer's chat template; stream: server-sent events
    POST /v1/completions         a prompt as is

Each request runs in a worker thread with an inference session of its own on one shared client, so requests
run concurrently; a client that hangs up mid-stream stops its generation and closes its session on the
servers. Errors are OpenAI error objects: 400 bad parameters, 401 a missing or wrong --api-key, 404 another
model, 411/413 a body without its length or over the cap, 503 blocks that no server holds (or servers that all
failed), 504 a request past --timeout. What one request may cost is bounded before it costs it (stop strings,
body size, prompt + max_tokens against the swarm's max_length), and one caller's requests beyond its share wait.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteria, StoppingCriteriaList

from swarm.apps.api_schema import (APIError, ChatRequest, CompletionRequest, Result, Sampling, TokenLogprob, chunk,
                                   completion, event)
from swarm.apps.sampling import sampling_processors

logger = logging.getLogger(__name__)


class Gate:
    """What is refused before a request reaches its route: a missing or wrong API key, then a body without its
    Content-Length (h11 holds a body to it) or over the cap, which is then never read. Plain ASGI: Starlette's
    BaseHTTPMiddleware delays a route's view of its caller hanging up by seconds."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int):
        self.app, self.api_key, self.max_request_bytes = app, api_key, max_request_bytes

    async def __call__(self, scope, receive, send) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> "APIError | None":
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.api_key and scope["path"].startswith("/v1/") and \
                headers.get("authorization", "") != f"Bearer {self.api_key}":
            return APIError(401, "a missing or wrong API key (Authorization: Bearer ...)", "authentication_error",
                            "invalid_api_key")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is None or not length.isdigit():
                return APIError(411, "a request body needs its Content-Length", code="length_required")
            if int(length) > self.max_request_bytes:
                return APIError(413, f"the request body is {int(length)} bytes; at most {self.max_request_bytes} are "
                                     f"accepted", code="request_too_large")
        return None


class Cancelled(StoppingCriteria):
    """Stops a generation whose caller hung up or whose time is up."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)


class StopTrimmer:
    """Text streamed as it comes, up to (not including) the first stop string; what might be the start of one
    is held back until it is known not to be."""

    def __init__(self, stops: list[str], emit):
        self.stops, self.emit = [s for s in stops if s], emit
        self.pending, self.stopped = "", False

    def put(self, text: str) -> None:
        if self.stopped:
            return
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._emit(self.pending[:cut])
            self.pending = ""
            return
        keep = max((len(s) - 1 for s in self.stops), default=0)
        ready = len(self.pending) - keep
        if ready > 0:
            self._emit(self.pending[:ready])
            self.pending = self.pending[ready:]

    def end(self) -> None:
        if not self.stopped:
            self._emit(self.pending)
        self.pending = ""

    def _emit(self, text: str) -> None:
        if text:
            self.emit(text)


class Streamer:
    """transformers' streamer protocol: decodes new tokens, hands finished text on (to a StopTrimmer)."""

    def __init__(self, tokenizer, sink: StopTrimmer):
        self.tokenizer, self.sink = tokenizer, sink
        self.tokens: list[int] = []
        self.printed, self.skip = 0, True

    def put(self, value: torch.Tensor) -> None:
        if self.skip:  # the first put() is the prompt
            self.skip = False
            return
        self.tokens.extend(value.flatten().tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # a character cut in half: wait for the rest of it
        self.sink.put(text[self.printed:])
        self.printed = len(text)

    def end(self) -> None:
        self.sink.end()


def create_app(model, tokenizer, model_name: str, *, api_key: str | None = None, timeout: float = 300.0,
               max_concurrent: int = 16, speculation: dict | None = None, max_length: int = 4096,
               max_request_bytes: int = 2**20, max_per_caller: int | None = None) -> FastAPI:
    """``speculation``: generate()'s arguments for speculative decoding, used for every request (a local draft
    ``assistant_model``, or ``prompt_lookup_num_tokens``); usage then counts accepted and rejected drafted tokens.
    ``max_length``: the swarm's longest session (prompt + completion), checked before anything is embedded.
    ``max_request_bytes``: the largest request body. ``max_per_caller``: requests one IP address may have
    generating at once (default: a quarter of ``max_concurrent``); its others wait for its own share."""
    speculation = speculation or {}
    shares = CallerShares(max_per_caller or max(1, max_concurrent // 4))
    drafts = speculation.get("prompt_lookup_num_tokens") or 0  # verified past max_length, then cut
    app = FastAPI(title="cocoon", description="An OpenAI-compatible API in front of a Cocoon swarm")
    workers = ThreadPoolExecutor(max_concurrent, thread_name_prefix="generate")

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '?')})"
                            ).response()
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return APIError(400, f"{where}: {first.get('msg', 'invalid request')}", param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = {404: f"no route {request.url.path}: this server answers /v1/chat/completions, /v1/completions, "
                        f"/v1/models and /health", 405: f"{request.method} is not allowed on {request.url.path}"}
        return APIError(error.status_code, message.get(error.status_code, str(error.detail)),
                        code="not_found" if error.status_code == 404 else None).response()

    app.add_middleware(Gate, api_key=api_key, max_request_bytes=max_request_bytes)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "cocoon"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_model(body)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        if tokenizer.chat_template is None:
            raise APIError(400, f"{model_name} has no chat template: use /v1/completions")
        _check_characters(sum(len(m["content"]) for m in messages))
        ids = await asyncio.to_thread(lambda: tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"])
        return await _respond(request, body, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request", param="prompt")
            prompt = prompt[0]
        _check_characters(len(prompt))
        ids = await asyncio.to_thread(lambda: tokenizer(prompt, return_tensors="pt").input_ids)
        return await _respond(request, body, ids, chat=False)

    def _check_model(body: Sampling) -> None:
        body.refuse_unsupported()
        if body.model not in (None, model_name):
            raise APIError(404, f"this server serves {model_name!r}, not {body.model!r}", code="model_not_found",
                           param="model")

    def _check_characters(characters: int) -> None:
        """A text far longer than max_length tokens could be is refused before it is tokenized (the tokenizer's
        tables for a million characters take hundreds of MB)."""
        if characters > max_length * MAX_CHARACTERS_PER_TOKEN:
            raise APIError(400, f"the prompt is {characters} characters: far more than this swarm's max_length of "
                                f"{max_length} tokens can hold", param="messages", code="context_length_exceeded")

    def _new_tokens(body: Sampling, prompt_length: int) -> int:
        """max_tokens, or what is left of the swarm's max_length after the prompt; refused past it."""
        asked = body.max_completion_tokens or body.max_tokens
        if prompt_length + (asked or 1) > max_length:
            raise APIError(400, f"the prompt is {prompt_length} tokens{f' and max_tokens {asked}' if asked else ''}: "
                                f"together at most {max_length} (this swarm's max_length)", param="max_tokens",
                           code="context_length_exceeded")
        return asked or min(DEFAULT_MAX_TOKENS, max_length - prompt_length)

    async def _respond(request: Request, body: Sampling, ids: torch.Tensor, chat: bool):
        limit = _new_tokens(body, ids.shape[1])
        identity = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created, cancel = int(time.time()), threading.Event()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        emit = (lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)) if body.stream else None
        caller = request.client.host if request.client else "?"
        await shares.acquire(caller)
        future = loop.run_in_executor(workers, _generate, body, ids, limit, emit, cancel)
        future.add_done_callback(lambda _: shares.release(caller))
        if not body.stream:
            deadline = loop.time() + timeout
            try:  # a caller that hangs up stops its generation at the next token
                while not future.done():
                    if await request.is_disconnected():
                        cancel.set()
                        raise APIError(499, "the caller hung up", code="client_closed_request")
                    if loop.time() > deadline:
                        cancel.set()
                        raise APIError(504, f"no answer within {timeout:.0f} s", "timeout", "timeout")
                    await asyncio.wait({future}, timeout=HANG_UP_POLL_SECONDS)
                result = future.result()
            except Exception as e:
                raise _as_api_error(e) from None
            return completion(model_name, identity, created, chat, result)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        return StreamingResponse(_events(identity, created, chat, pieces, future, cancel),
                                 media_type="text/event-stream")

    async def _events(identity, created, chat, pieces: asyncio.Queue, future, cancel: threading.Event):
        """Server-sent events in OpenAI's chunk format, ending with [DONE]; a caller that hangs up (the task is
        cancelled) stops the generation, and its session closes on the servers."""
        deadline = time.monotonic() + timeout
        try:
            if chat:
                yield event(chunk(model_name, identity, created, chat, {"role": "assistant", "content": ""}))
            while (piece := await asyncio.wait_for(pieces.get(), max(deadline - time.monotonic(), 0.01))) is not None:
                yield event(chunk(model_name, identity, created, chat, {"content": piece} if chat else piece))
            result = await future
            yield event(chunk(model_name, identity, created, chat, {} if chat else "", result.finish_reason, result))
        except asyncio.TimeoutError:
            cancel.set()
            yield event(APIError(504, f"no answer within {timeout:.0f} s", "timeout", "timeout").response().body)
        except Exception as e:
            yield event(_as_api_error(e).response().body)
        finally:
            cancel.set()  # (a finished generation ignores it; one still running stops at its next token)
        yield "data: [DONE]\n\n"

    def _generate(body: Sampling, ids: torch.Tensor, limit: int, emit, cancel: threading.Event) -> Result:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        texts: list[str] = []
        trimmer = StopTrimmer(stops, lambda text: (texts.append(text), emit and emit(text)))
        prompt_length = ids.shape[1]
        alternatives = body.alternatives()
        with model.inference_session(max_length=prompt_length + limit + drafts) as session:
            output = model.generate(ids.to(model.device), max_new_tokens=limit, do_sample=False,
                                    logits_processor=sampling_processors(body.temperature, body.top_p, body.seed,
                                                                         prompt_length, body.frequency_penalty,
                                                                         body.presence_penalty),
                                    stopping_criteria=StoppingCriteriaList([Cancelled(cancel)]),
                                    stop_strings=stops or None, tokenizer=tokenizer,
                                    streamer=Streamer(tokenizer, trimmer),
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                    return_dict_in_generate=True, output_logits=alternatives is not None,
                                    **speculation)
        new = output.sequences[0, prompt_length:].tolist()
        logprobs = TokenLogprob.of(tokenizer, new, output.logits, alternatives) if alternatives is not None else None
        ended = bool(new) and new[-1] == tokenizer.eos_token_id
        # each step through the swarm gave one token of its own; the others were drafted tokens it accepted
        predictions = (max(len(new) - session.steps, 0), session.rolled_back) if speculation else None
        return Result("".join(texts), prompt_length, len(new), "stop" if ended or trimmer.stopped else "length",
                      predictions, logprobs)

    return app


DEFAULT_MAX_TOKENS = 256
MAX_CHARACTERS_PER_TOKEN = 16  # well above any tokenizer's average over a prompt (English: about 4)
HANG_UP_POLL_SECONDS = 0.2


class CallerShares:
    """At most ``per_caller`` requests of one caller generate at once: a caller that sends many waits for its own
    share, instead of filling the workers (or their queue) ahead of everyone else."""

    def __init__(self, per_caller: int):
        self.per_caller = per_caller
        self.running: dict[str, int] = {}
        self.freed = asyncio.Condition()

    async def acquire(self, caller: str) -> None:
        async with self.freed:
            await self.freed.wait_for(lambda: self.running.get(caller, 0) < self.per_caller)
            self.running[caller] = self.running.get(caller, 0) + 1

    def release(self, caller: str) -> None:
        """From the generation's done callback, on the event loop."""
        self.running[caller] -= 1
        if not self.running[caller]:
            del self.running[caller]
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.freed:
            self.freed.notify_all()


def _as_api_error(error: Exception) -> APIError:
    from routing import NoChainError
    from swarm.client.failover import SwarmError
    if isinstance(error, APIError):
        return error
    if isinstance(error, (NoChainError, SwarmError)):
        return APIError(503, str(error), "service_unavailable", "swarm_unavailable")
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    logger.exception("a request failed")
    return APIError(500, f"{type(error).__name__}: {error}", "server_error")
