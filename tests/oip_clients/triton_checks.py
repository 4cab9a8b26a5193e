"""Run by the tests in a venv holding tritonclient[grpc] (not ortmux's worker): Triton's own client
against a real worker. Writes what it got to an .npz for the test to compare with the native
client, and prints one JSON line of the other findings.

    python triton_checks.py ADDRESS API_KEY OUT.npz
"""

from __future__ import annotations

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

address, api_key, out = sys.argv[1:4]
headers = {"authorization": f"Bearer {api_key}"}
client = triton.InferenceServerClient(address)
ids = np.arange(16, dtype=np.int64).reshape(2, 8) % 1000
found: dict[str, object] = {}
arrays: dict[str, np.ndarray] = {}


def inputs_of(array: np.ndarray, name: str = "input_ids", datatype: str = "INT64") -> list:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return [tensor]


def status_of(call) -> str:
    try:
        call()
    except InferenceServerException as exc:
        return str(exc.status())
    return "OK"


found["live"] = client.is_server_live()  # probes: no key
found["ready"] = client.is_server_ready()
found["extensions"] = list(client.get_server_metadata(headers=headers).extensions)
meta = client.get_model_metadata("demo:acme-a", headers=headers, as_json=True)
found["metadata"] = [
    meta["name"],
    meta["platform"],
    [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]],
]
config = client.get_model_config("demo", headers=headers, as_json=True)["config"]
found["config"] = [config["name"], config.get("max_batch_size"), [i["name"] for i in config["input"]]]
found["model_ready"] = [
    client.is_model_ready("demo", headers=headers),
    client.is_model_ready("demo:acme-a", headers=headers),
    client.is_model_ready("demo:nope", headers=headers),
]
found["index"] = sorted(
    m["name"] for m in client.get_model_repository_index(headers=headers, as_json=True)["models"]
)

arrays["base"] = client.infer("demo", inputs_of(ids), headers=headers).as_numpy("logits")
arrays["by_name"] = client.infer("demo:acme-a", inputs_of(ids), headers=headers).as_numpy("logits")
arrays["by_parameter"] = client.infer(
    "demo", inputs_of(ids), headers=headers, parameters={"lora_name": "acme-a"}
).as_numpy("logits")
requested = client.infer(
    "demo:acme-a",
    inputs_of(ids),
    headers=headers,
    outputs=[triton.InferRequestedOutput("logits")],
    request_id="x1",
)
found["request_id"] = requested.get_response().id
found["model_name"] = requested.get_response().model_name

for datatype, dtype in (
    ("BOOL", np.bool_),
    ("UINT8", np.uint8),
    ("UINT16", np.uint16),
    ("UINT32", np.uint32),
    ("UINT64", np.uint64),
    ("INT8", np.int8),
    ("INT16", np.int16),
    ("INT32", np.int32),
    ("INT64", np.int64),
    ("FP16", np.float16),
    ("FP32", np.float32),
    ("FP64", np.float64),
):
    arrays[f"sent_{datatype}"] = (
        (np.arange(6).reshape(2, 3) % 2 == 1)
        if dtype is np.bool_
        else (np.arange(6).reshape(2, 3) + 1).astype(dtype)
    )
request = []
for datatype in [k.removeprefix("sent_") for k in arrays if k.startswith("sent_")]:
    request += inputs_of(arrays[f"sent_{datatype}"], f"in_{datatype.lower()}", datatype)
typed = client.infer("types", request, headers=headers)
for datatype in [k.removeprefix("sent_") for k in list(arrays) if k.startswith("sent_")]:
    arrays[f"got_{datatype}"] = typed.as_numpy(f"out_{datatype.lower()}")

answers: queue.Queue = queue.Queue()
client.start_stream(lambda result, error: answers.put((result, error)), headers=headers)
for index, name in enumerate(["demo:acme-a", "demo:nope", "demo"]):
    client.async_stream_infer(name, inputs_of(ids), request_id=f"s{index}")
streamed = {}
errors = []
for _ in range(3):
    result, error = answers.get(timeout=60)
    if error is not None:
        errors.append(str(error))
    else:
        streamed[result.get_response().id] = result.as_numpy("logits")
client.stop_stream()
arrays["stream_adapter"], arrays["stream_base"] = streamed["s0"], streamed["s2"]
found["stream_errors"] = errors

found["unknown_adapter"] = status_of(lambda: client.infer("demo:nope", inputs_of(ids), headers=headers))
found["no_key"] = status_of(lambda: client.infer("demo", inputs_of(ids)))
found["both_names"] = status_of(
    lambda: client.infer("demo:acme-a", inputs_of(ids), headers=headers, parameters={"lora_name": "b"})
)
found["statistics"] = client.get_inference_statistics("demo", headers=headers, as_json=True)["model_stats"][
    0
]["inference_stats"]["success"]["count"]
found["shared_memory"] = status_of(lambda: client.get_system_shared_memory_status(headers=headers))
np.savez(out, **arrays)
print(json.dumps(found))
