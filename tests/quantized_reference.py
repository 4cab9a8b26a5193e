"""References for adapters on quantized bases, built without the worker: the quantized model with
each row's LoRA branches written into the graph as constants (onnx.helper), run by a plain session.

A branch reads the float tensor the float model's projection read and adds ``x @ A @ (scale * B)``
to the float tensor it produced; the quantizers keep both names, so they are found on the float
model and applied to the quantized one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ortmux.worker.adapters import safetensors

from .conftest import plain_session

FIXTURE_SCRIPT = Path(__file__).resolve().parent / "quantize_fixture.py"


def quantize(kind: str, source: Path, out: Path) -> Path:
    """``source`` quantized by onnxruntime's tools, in a process of their own (see the script)."""
    subprocess.run(
        [sys.executable, str(FIXTURE_SCRIPT), kind, str(source.resolve()), str(out.resolve())],
        cwd=out.parent,  # the tools leave temporary files in the working directory
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def peft_factors(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module -> (A [in, r], scale * B [r, out]) of a PEFT directory without rank patterns."""
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = safetensors.load((directory / "adapter_model.safetensors").read_bytes())
    scale = config["lora_alpha"] / config["r"]
    factors = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = tensors[key.replace("lora_A", "lora_B")]
            factors[module] = (a.T.astype(np.float32), (scale * b.T).astype(np.float32))
    return factors


def projection_tensors(float_model: onnx.ModelProto, weight: str) -> tuple[str, str]:
    """(activation, result) of the float model's MatMul on ``weight`` (directly or transposed)."""
    transposed = {
        n.output[0] for n in float_model.graph.node if n.op_type == "Transpose" and n.input[0] == weight
    }
    for node in float_model.graph.node:
        if node.op_type == "MatMul" and (node.input[1] == weight or node.input[1] in transposed):
            return node.input[0], node.output[0]
    raise KeyError(weight)


def branched_reference(
    quantized: Path,
    float_model: onnx.ModelProto,
    rows: Sequence[dict[str, tuple[np.ndarray, np.ndarray]] | None],
    feeds: dict[str, np.ndarray],
    weight_of=lambda module: f"{module}.weight",
) -> np.ndarray:
    """The first output of ``quantized`` with row ``i`` of ``feeds`` given the factors ``rows[i]``
    (module -> (A, B); None: no adapter)."""
    model = onnx.load(str(quantized))
    producers = {output: index for index, node in enumerate(model.graph.node) for output in node.output}
    modules = sorted({module for factors in rows if factors for module in factors})
    after: dict[int, list[onnx.NodeProto]] = {}  # branch nodes, by the index of the node they follow
    for index, module in enumerate(modules):
        activation, result = projection_tensors(float_model, weight_of(module))
        shaped = [factors[module] for factors in rows if factors and module in factors]
        fan_in, fan_out = shaped[0][0].shape[0], shaped[0][1].shape[1]
        rank = max(a.shape[1] for a, _b in shaped)
        a_rows = np.zeros((len(rows), fan_in, rank), np.float32)
        b_rows = np.zeros((len(rows), rank, fan_out), np.float32)
        for row, factors in enumerate(rows):
            if factors and module in factors:
                a, b = factors[module]
                a_rows[row, :, : a.shape[1]] = a
                b_rows[row, : b.shape[0]] = b
        if result not in producers:  # an optimizer fused the projection with what followed it
            result = _fused_result(model, weight_of(module))
        model.graph.node[producers[result]].output[0] = f"{result}.reference_base"
        prefix = f"reference.{index}"
        model.graph.initializer.extend(
            [numpy_helper.from_array(a_rows, f"{prefix}.a"), numpy_helper.from_array(b_rows, f"{prefix}.b")]
        )
        after[producers[result]] = [
            helper.make_node("MatMul", [activation, f"{prefix}.a"], [f"{prefix}.xa"]),
            helper.make_node("MatMul", [f"{prefix}.xa", f"{prefix}.b"], [f"{prefix}.delta"]),
            helper.make_node("Add", [f"{result}.reference_base", f"{prefix}.delta"], [result]),
        ]
    # Right after the projection: its activation is computed before it, its result read after.
    nodes = [item for index, node in enumerate(model.graph.node) for item in (node, *after.get(index, ()))]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "reference.onnx"
        onnx.save(model, str(path))
        return plain_session(path).run(None, feeds)[0]


def _fused_result(model: onnx.ModelProto, weight: str) -> str:
    """The output of the one node reading the quantized form of ``weight`` (``<weight>_...``)."""
    (node,) = [n for n in model.graph.node if any(name.startswith(f"{weight}_") for name in n.input)]
    return node.output[0]
