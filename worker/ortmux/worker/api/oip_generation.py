"""Triton's LLM protocol over the Open Inference Protocol, as its vLLM backend defines it: a model
called with ``text_input`` generates. Inputs (each of shape [1]): ``text_input`` (BYTES),
``stream`` and ``exclude_input_in_output`` (BOOL), ``sampling_parameters`` (a JSON string),
``return_finish_reason``, ``return_num_input_tokens``, ``return_num_output_tokens`` (BOOL);
output ``text_output`` (BYTES) and the extras asked for. Streaming sends one response per chunk
with only the new text, the last marked by the ``triton_final_response`` parameter; otherwise one
response carries the whole text, after the prompt when ``exclude_input_in_output`` is false.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable

import numpy as np

from ortmux.worker.api.inference_v2 import grpc_service_pb2 as oip
from ortmux.worker.api.oip_convert import LORA_PARAMETER, decode_inputs, encode_tensor, split_name
from ortmux.worker.dataplane import GenerationRequest
from ortmux.worker.errors import InvalidArgument
from ortmux.worker.generation.job import Chunk
from ortmux.worker.generation.sampling import SamplingParams

TEXT_INPUT = "text_input"
FLAGS = (
    "stream",
    "exclude_input_in_output",
    "return_finish_reason",
    "return_num_input_tokens",
    "return_num_output_tokens",
)
INPUTS = (TEXT_INPUT, "sampling_parameters", *FLAGS)
FINAL = "triton_final_response"
# sampling_parameters keys: how each is read; the neutral values of keys ortmux does not implement.
NUMBERS = {"temperature": float, "top_p": float, "top_k": int, "max_tokens": int, "seed": int}
NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
ACCEPTED = (*NUMBERS, "stop", "stop_token_ids", "lora_name", "ignore_eos", *NEUTRAL)


@dataclasses.dataclass(frozen=True)
class TritonGeneration:
    request: GenerationRequest
    model_name: str
    request_id: str
    prompt: str
    stream: bool
    exclude_input: bool
    finish_reason: bool
    input_tokens: bool
    output_tokens: bool


def is_generation(request: oip.ModelInferRequest) -> bool:
    return any(tensor.name == TEXT_INPUT for tensor in request.inputs)


def parse(
    request: oip.ModelInferRequest, deadline: float | None, is_active: Callable[[], bool], tenant: str
) -> TritonGeneration:
    inputs = decode_inputs(request)
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise InvalidArgument(
            f"inputs {unknown} are not inputs of a generation; it takes {', '.join(INPUTS)}", field="inputs"
        )
    flags = {name: bool(_single(inputs, name, False)) for name in FLAGS}
    prompt = _text(_single(inputs, TEXT_INPUT, b""), TEXT_INPUT)
    sampling = _sampling(_single(inputs, "sampling_parameters", b""))
    parameters = dict(request.parameters)
    if "lora_name" in sampling and LORA_PARAMETER not in parameters:
        parameters[LORA_PARAMETER] = oip.InferParameter(string_param=str(sampling["lora_name"]))
    base, adapter = split_name(request.model_name, parameters)
    stop = sampling.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidArgument(
            "sampling_parameters 'stop' must be a string or a list of strings", field="stop"
        )
    stop_ids = sampling.get("stop_token_ids", [])
    if not isinstance(stop_ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in stop_ids
    ):
        raise InvalidArgument(
            "sampling_parameters 'stop_token_ids' must be a list of token ids", field="stop_token_ids"
        )
    top_k = int(sampling.get("top_k", 0))
    return TritonGeneration(
        request=GenerationRequest(
            model=base,
            prompt=prompt,
            adapter=adapter,
            max_new_tokens=int(sampling.get("max_tokens", 16)),
            sampling=SamplingParams(
                temperature=float(sampling.get("temperature", 0.0)),
                top_k=0 if top_k == -1 else top_k,
                top_p=float(sampling.get("top_p", 1.0)),
                seed=int(sampling["seed"]) if "seed" in sampling else None,
            ),
            stop=tuple(stop),
            stop_ids=tuple(stop_ids),
            request_id=request.id,
            tenant=tenant,
            deadline=deadline,
            is_active=is_active,
        ),
        model_name=request.model_name,
        request_id=request.id,
        prompt=prompt,
        stream=flags["stream"],
        exclude_input=flags["exclude_input_in_output"],
        finish_reason=flags["return_finish_reason"],
        input_tokens=flags["return_num_input_tokens"],
        output_tokens=flags["return_num_output_tokens"],
    )


async def responses(
    generation: TritonGeneration, chunks: AsyncIterable[Chunk]
) -> AsyncIterator[oip.ModelInferResponse]:
    """The responses of one generation: a response per chunk when streaming, else one."""
    if generation.stream:
        async for chunk in chunks:
            yield _response(generation, chunk.text, chunk, final=bool(chunk.finish_reason))
        return
    texts, last = [], None
    async for chunk in chunks:
        texts.append(chunk.text)
        last = chunk
    prompt = "" if generation.exclude_input else generation.prompt
    yield _response(generation, prompt + "".join(texts), last, final=True)


def _response(
    generation: TritonGeneration, text: str, chunk: Chunk | None, final: bool
) -> oip.ModelInferResponse:
    response = oip.ModelInferResponse(
        model_name=generation.model_name, model_version="1", id=generation.request_id
    )
    outputs: list[tuple[str, str, np.ndarray]] = [("text_output", "BYTES", np.array([text.encode()], object))]
    if final and chunk is not None:
        if generation.finish_reason:
            outputs.append(("finish_reason", "BYTES", np.array([chunk.finish_reason.encode()], object)))
        if generation.input_tokens:
            outputs.append(("num_input_tokens", "UINT32", np.array([chunk.prompt_tokens], np.uint32)))
        if generation.output_tokens:
            outputs.append(("num_output_tokens", "UINT32", np.array([chunk.completion_tokens], np.uint32)))
    for name, datatype, array in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=[1])
        response.raw_output_contents.append(encode_tensor(array))
    response.parameters[FINAL].bool_param = final
    return response


def model_io() -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(inputs, outputs) a generating model shows in ModelMetadata / ModelConfig: (name, datatype, shape)."""
    inputs = [(TEXT_INPUT, "BYTES", [1]), ("sampling_parameters", "BYTES", [1])]
    inputs += [(name, "BOOL", [1]) for name in FLAGS]
    outputs = [
        ("text_output", "BYTES", [-1]),
        ("finish_reason", "BYTES", [-1]),
        ("num_input_tokens", "UINT32", [1]),
        ("num_output_tokens", "UINT32", [1]),
    ]
    return inputs, outputs


def _single(inputs: dict[str, np.ndarray], name: str, default: object) -> object:
    array = inputs.get(name)
    if array is None:
        return default
    if array.size != 1:
        raise InvalidArgument(
            f"input '{name}' must hold one element (shape [1]), got {list(array.shape)}", field=name
        )
    return array.reshape(-1)[0]


def _text(value: object, name: str) -> str:
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"input '{name}' is not UTF-8 text", field=name) from None
    if isinstance(value, str):
        return value
    raise InvalidArgument(f"input '{name}' must be BYTES (text)", field=name)


def _sampling(value: object) -> dict[str, object]:
    """sampling_parameters: a JSON object of known keys; numbers may arrive as strings ("0.1")."""
    text = _text(value, "sampling_parameters") if value != b"" else "{}"
    try:
        given = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"sampling_parameters is not JSON: {exc}", field="sampling_parameters"
        ) from None
    if not isinstance(given, dict):
        raise InvalidArgument("sampling_parameters must be a JSON object", field="sampling_parameters")
    unknown = sorted(set(given) - set(ACCEPTED))
    if unknown:
        raise InvalidArgument(
            f"sampling_parameters {unknown} are not supported; accepted: {', '.join(ACCEPTED)}",
            field="sampling_parameters",
        )
    values: dict[str, object] = {}
    for key, raw in given.items():
        if key in NUMBERS or key in NEUTRAL:
            kind = NUMBERS.get(key, type(NEUTRAL.get(key)))
            try:
                number = kind(float(raw)) if kind is int else kind(raw)
            except (TypeError, ValueError, OverflowError):
                raise InvalidArgument(
                    f"sampling_parameters '{key}' must be a number, got {raw!r}", field=key
                ) from None
            if isinstance(number, float) and not math.isfinite(number):
                raise InvalidArgument(f"sampling_parameters '{key}' must be finite", field=key)
            if key in NEUTRAL and number != NEUTRAL[key]:
                raise InvalidArgument(
                    f"sampling_parameters '{key}' = {raw!r} is not supported (only {NEUTRAL[key]})", field=key
                )
            values[key] = number
        elif key == "ignore_eos":
            if raw not in (False, "false", "False", 0):
                raise InvalidArgument("sampling_parameters 'ignore_eos' is not supported", field=key)
        else:
            values[key] = raw
    return values
