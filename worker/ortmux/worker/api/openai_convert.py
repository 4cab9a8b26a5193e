"""OpenAI's completions and chat completions JSON <-> the generation path's types, and errors in
OpenAI's shape with the matching HTTP status. Every parameter is either served, accepted at its
neutral value (what the openai package and LangChain send by default), or refused with a 400
naming it: nothing is ignored silently."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping

from ortmux.worker.dataplane import GenerationRequest
from ortmux.worker.errors import ErrorCode, InvalidArgument, WorkerError
from ortmux.worker.generation.job import Chunk
from ortmux.worker.generation.sampling import SamplingParams

HTTP_STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.FAILED_PRECONDITION: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNIMPLEMENTED: 501,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
}
# Parameters accepted only at these values (the clients' defaults), and those served.
NEUTRAL: dict[str, object] = {
    "n": 1,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": {},
    "logprobs": None,
    "top_logprobs": None,
    "echo": False,
    "best_of": 1,
    "suffix": None,
    "parallel_tool_calls": None,
    "tools": None,
    "tool_choice": None,
    "response_format": None,
}
SERVED = {
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
}
SERVED |= {"stop", "stream", "stream_options", "user"}
FINISH = {"length": "length", "stop": "stop", "eos": "stop"}
DEFAULT_MAX_TOKENS = 16


def error_body(error: WorkerError) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, OpenAI error JSON, headers) of an error."""
    status = HTTP_STATUS.get(error.code, 500)
    headers = {"Retry-After": str(max(1, math.ceil(error.retry_after)))} if error.retry_after else {}
    body = {
        "error": {
            "message": error.message,
            "type": ERROR_TYPE.get(status, "server_error" if status >= 500 else "rate_limit_error"),
            "param": error.field,
            "code": error.reason.lower(),
        }
    }
    return status, body, headers


def split_model(name: object) -> tuple[str, str]:
    """``base`` or ``base:adapter``."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("'model' must name a model: 'base' or 'base:adapter'", field="model")
    base, _, adapter = name.partition(":")
    return base, adapter


def generation_request(
    body: Mapping[str, object],
    chat: bool,
    tenant: str,
    deadline: float | None,
    is_active: Callable[[], bool],
) -> GenerationRequest:
    """The generation a completions (``chat`` False) or chat completions request asks for."""
    for key, value in body.items():
        if key in NEUTRAL:
            if value is not None and value != NEUTRAL[key]:
                raise InvalidArgument(f"'{key}' = {value!r} is not supported", field=key)
        elif key not in SERVED:
            raise InvalidArgument(f"'{key}' is not supported", field=key)
    base, adapter = split_model(body.get("model"))
    prompt, ids, messages = None, None, None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(_is_message(m) for m in messages):
            raise InvalidArgument("'messages' must be a list of {role, content} objects", field="messages")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            prompt, ids = None, prompt  # token ids
        elif not isinstance(prompt, str):
            raise InvalidArgument(
                "'prompt' must be a string or a list of token ids (one prompt per request)", field="prompt"
            )
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    limit = DEFAULT_MAX_TOKENS if limit is None else limit
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidArgument("'stop' must be a string or a list of strings", field="stop")
    if not isinstance(body.get("stream", False), bool | None):
        raise InvalidArgument("'stream' must be true or false", field="stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise InvalidArgument("'stream_options' takes only include_usage", field="stream_options")
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    seed = body.get("seed")
    for key, value in (("max_tokens", limit), ("seed", seed)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise InvalidArgument(f"'{key}' must be an integer", field=key)
    for key, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise InvalidArgument(f"'{key}' must be a number", field=key)
        if isinstance(value, int) and abs(value) > 1 << 53:
            raise InvalidArgument(f"'{key}' is out of range", field=key)
    return GenerationRequest(
        model=base,
        adapter=adapter,
        prompt=prompt,
        input_ids=ids,
        messages=messages,
        max_new_tokens=limit,  # type: ignore[arg-type]
        sampling=SamplingParams(
            temperature=1.0 if temperature is None else float(temperature),  # OpenAI's default
            top_p=1.0 if top_p is None else float(top_p),
            seed=seed,  # type: ignore[arg-type]
        ),
        stop=tuple(stop),
        tenant=tenant,
        deadline=deadline,
        is_active=is_active,
    )


def _is_message(message: object) -> bool:
    return isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message


class Answer:
    """The JSON objects of one answer, streamed or whole."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, streamed: bool) -> dict:
        kind = (
            ("chat.completion.chunk" if streamed else "chat.completion") if self.chat else "text_completion"
        )
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, chunk: Chunk, first: bool) -> dict:
        reason = FINISH.get(chunk.finish_reason) if chunk.finish_reason else None
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if first else {}
            if chunk.text:
                delta["content"] = chunk.text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": reason}
        return {**self._envelope(True), "choices": [choice]}

    def usage_chunk(self, last: Chunk) -> dict:
        return {**self._envelope(True), "choices": [], "usage": usage(last)}

    def whole(self, text: str, last: Chunk) -> dict:
        reason = FINISH.get(last.finish_reason, "stop")
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._envelope(False), "choices": [choice], "usage": usage(last)}


def usage(last: Chunk) -> dict:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
    }
