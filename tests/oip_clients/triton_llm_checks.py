"""Run by the tests in a venv holding tritonclient[grpc]: Triton's LLM protocol (as its vLLM backend
defines it) against a real worker serving a decoder. Prints one JSON line of what it got.

    python triton_llm_checks.py ADDRESS API_KEY MODEL ADAPTER PROMPT MAX_TOKENS
"""

from __future__ import annotations

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

address, api_key, model, adapter, prompt, max_tokens = sys.argv[1:7]
headers = {"authorization": f"Bearer {api_key}"}
client = triton.InferenceServerClient(address)
found: dict[str, object] = {}


def llm_inputs(text: str, stream: bool, sampling: dict | str, exclude: bool = True) -> list:
    tensors = []
    for name, datatype, value in (
        ("text_input", "BYTES", np.array([text.encode()], dtype=object)),
        ("stream", "BOOL", np.array([stream])),
        (
            "sampling_parameters",
            "BYTES",
            np.array(
                [(sampling if isinstance(sampling, str) else json.dumps(sampling)).encode()], dtype=object
            ),
        ),
        ("exclude_input_in_output", "BOOL", np.array([exclude])),
        ("return_finish_reason", "BOOL", np.array([True])),
        ("return_num_output_tokens", "BOOL", np.array([True])),
    ):
        tensor = triton.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def streamed(name: str, inputs: list) -> tuple[list[str], dict]:
    """The text of every response of one streamed request, and the last response's extras."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
    client.async_stream_infer(name, inputs, request_id="g1")
    texts, extras = [], {}
    while True:
        result, error = answers.get(timeout=60)
        if error is not None:
            client.stop_stream()
            return [f"ERROR {error}"], {}
        response = result.get_response()
        texts.append(result.as_numpy("text_output")[0].decode())
        if response.parameters["triton_final_response"].bool_param:
            extras = {
                "finish_reason": result.as_numpy("finish_reason")[0].decode(),
                "num_output_tokens": int(result.as_numpy("num_output_tokens")[0]),
                "id": response.id,
            }
            break
    client.stop_stream()
    return texts, extras


params = {"max_tokens": max_tokens, "temperature": "0", "top_k": -1}
found["stream_lora_name"] = streamed(model, llm_inputs(prompt, True, {**params, "lora_name": adapter}))
found["stream_qualified"] = streamed(f"{model}:{adapter}", llm_inputs(prompt, True, params))
found["stream_base"] = streamed(model, llm_inputs(prompt, True, params))
found["not_streamed"] = streamed(f"{model}:{adapter}", llm_inputs(prompt, False, params))
whole = client.infer(f"{model}:{adapter}", llm_inputs(prompt, False, params, exclude=False), headers=headers)
found["infer_echo"] = whole.as_numpy("text_output")[0].decode()
config = client.get_model_config(model, headers=headers).config
found["decoupled"] = config.model_transaction_policy.decoupled
found["config_inputs"] = [i.name for i in config.input]
found["metadata_outputs"] = [o.name for o in client.get_model_metadata(model, headers=headers).outputs]


def status_of(call) -> str:
    try:
        call()
    except InferenceServerException as exc:
        return f"{exc.status()} {exc.message()}"
    return "OK"


found["bad_json"] = status_of(
    lambda: client.infer(model, llm_inputs(prompt, False, "{not json"), headers=headers)
)
found["unknown_key"] = status_of(
    lambda: client.infer(model, llm_inputs(prompt, False, {"beam_width": 2}), headers=headers)
)
found["unknown_adapter"] = status_of(
    lambda: client.infer(f"{model}:nope", llm_inputs(prompt, False, params), headers=headers)
)
print(json.dumps(found))
