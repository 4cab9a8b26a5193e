"""Quantized weights and projections of a graph.

The quantizers rename the weights they replace (``<weight>_quantized``, ``<weight>_Q4``, ...) and
replace a float ``MatMul`` by one of these patterns, each with a float activation going in and a
float result coming out, which is where a LoRA branch reads and adds:

- ``quantize_dynamic``: DynamicQuantizeLinear(x) -> MatMulInteger -> Cast -> Mul (by the product
  of scales); ONNX Runtime fuses it into DynamicQuantizeMatMul, which a saved optimized model holds;
- ``quantize_static`` in QDQ format: MatMul(DequantizeLinear(QuantizeLinear(x)), DequantizeLinear(W));
- ``MatMulNBitsQuantizer`` (4-bit weight-only): MatMulNBits(x, packed W, scales[, zero points]).

QOperator formats (QLinearMatMul, QGemm) produce quantized outputs: a float branch cannot be added
there without requantizing, so they are reported as projections that cannot take one.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping

import onnx

# Quantized operator -> the input that carries its quantized weight.
WEIGHT_INPUT = {
    "MatMulInteger": 1,
    "DynamicQuantizeMatMul": 1,
    "MatMulIntegerToFloat": 1,
    "MatMulNBits": 1,
    "QLinearMatMul": 3,
    "QGemm": 3,
    "ConvInteger": 1,
    "QLinearConv": 3,
    "DequantizeLinear": 0,
}
PROJECTIONS = frozenset(
    {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits"}
    | {"QLinearMatMul", "QGemm"}
)
QUANTIZED_OUTPUT = frozenset({"QLinearMatMul", "QGemm"})
# Dynamic int8 operators only ONNX Runtime's CPU provider implements: on a CUDA worker they run on
# the CPU, with the activations copied to the host and back around each one (MatMulNBits and
# QuantizeLinear / DequantizeLinear have CUDA kernels).
CPU_ONLY = frozenset(
    {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
)
_ACTIVATION_QUANTIZERS = frozenset({"DynamicQuantizeLinear", "QuantizeLinear"})
_SUFFIXES = ("_quantized", "_Q4", "_Q8", "_q4", "_q8", "_quant")


@dataclasses.dataclass(frozen=True)
class QuantizedProjection:
    """A quantized ``y = x @ W``: where its float activation enters and its float result leaves."""

    op_type: str
    weight: str  # the quantized initializer
    activation: str
    output_node: onnx.NodeProto  # the node whose first output is the float result
    in_features: int
    out_features: int
    dtype: int  # onnx TensorProto type of the activation and result
    # Float weights only: the 2-D shape the projection reads the initializer as (a Reshape may
    # give it one), and whether that is [out, in] (transposed on the way, or Gemm's transB).
    weight_shape: tuple[int, ...] = ()
    transposed: bool = False


def quantized_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Initializer -> the quantized operator that reads it as its weight."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    found: dict[str, str] = {}
    for node in model.graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] in initializers:
            found.setdefault(node.input[index], node.op_type)
    return found


def stem(name: str) -> str:
    """The weight name a quantizer started from: ``q_proj.weight_quantized`` -> ``q_proj.weight``."""
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def replaced_by(name: str, quantized: Mapping[str, object]) -> str | None:
    """The quantized initializer that took the place of weight ``name``, if one did."""
    if name in quantized:
        return name
    for candidate in sorted(quantized):
        start = stem(candidate)
        if start == name or start.startswith(f"{name}_"):
            return candidate
    return None


def projection_counts(quantized: dict[str, str]) -> dict[str, int]:
    """Quantized projections by operator (MatMulInteger: 13, ...)."""
    return dict(sorted(collections.Counter(op for op in quantized.values() if op in PROJECTIONS).items()))


def quantized_projection(
    node: onnx.NodeProto,
    initializers: Mapping[str, onnx.TensorProto],
    producers: Mapping[str, onnx.NodeProto],
    consumers: Mapping[str, list[onnx.NodeProto]],
) -> QuantizedProjection | str | None:
    """The projection ``node`` computes on a quantized weight; why no branch can take it (a
    string); or None when ``node`` is no quantized projection."""
    if node.op_type not in PROJECTIONS or len(node.input) <= WEIGHT_INPUT[node.op_type]:
        return None
    weight = node.input[WEIGHT_INPUT[node.op_type]]
    tensor = initializers.get(weight)
    if tensor is None:
        return None
    if node.op_type in QUANTIZED_OUTPUT:
        return (
            f"quantized in QOperator format: {node.op_type} yields a quantized result that a float "
            "LoRA branch cannot be added to; quantize with quant_format=QuantFormat.QDQ or with "
            "quantize_dynamic, or serve the float model"
        )
    attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    if node.op_type == "MatMulNBits":
        scales = initializers.get(node.input[2]) if len(node.input) > 2 else None
        dtype = scales.data_type if scales is not None else onnx.TensorProto.FLOAT
        return QuantizedProjection(
            node.op_type, weight, node.input[0], node, int(attrs["K"]), int(attrs["N"]), dtype
        )
    if len(tensor.dims) != 2:
        return f"{node.op_type} weight '{weight}' is {len(tensor.dims)}-D"
    in_features, out_features = (int(d) for d in tensor.dims)
    if node.op_type == "DynamicQuantizeMatMul":
        return QuantizedProjection(
            node.op_type, weight, node.input[0], node, in_features, out_features, onnx.TensorProto.FLOAT
        )
    quantizer = producers.get(node.input[0])
    if quantizer is None or quantizer.op_type not in _ACTIVATION_QUANTIZERS:
        return f"{node.op_type} reads an activation that no QuantizeLinear makes from a float tensor"
    activation = quantizer.input[0]
    if node.op_type == "MatMulIntegerToFloat":
        return QuantizedProjection(
            node.op_type, weight, activation, node, in_features, out_features, onnx.TensorProto.FLOAT
        )
    # MatMulInteger's int32 result becomes float through Cast, then Mul by the scales.
    cast = _only(consumers.get(node.output[0], []), "Cast")
    scaled = _only(consumers.get(cast.output[0], []), "Mul") if cast is not None else None
    if cast is None or scaled is None:
        return "MatMulInteger's int32 result is not turned back into float by one Cast and one Mul"
    to = next((onnx.helper.get_attribute_value(a) for a in cast.attribute if a.name == "to"), 0)
    return QuantizedProjection(node.op_type, weight, activation, scaled, in_features, out_features, to)


def cpu_only_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes of operators in :data:`CPU_ONLY`, by operator."""
    return dict(
        sorted(collections.Counter(n.op_type for n in model.graph.node if n.op_type in CPU_ONLY).items())
    )


def unsavable_prepacking(model: onnx.ModelProto) -> int:
    """MatMulNBits nodes at ``accuracy_level`` 4 (int8 compute): ONNX Runtime 1.31 reloads their
    saved prepacked weights wrong (NaN results), so a graph holding them is saved unpacked and
    each session prepacks them itself."""
    return sum(
        1
        for node in model.graph.node
        if node.op_type == "MatMulNBits"
        and any(attr.name == "accuracy_level" and attr.i == 4 for attr in node.attribute)
    )


def _only(nodes: list[onnx.NodeProto], op_type: str) -> onnx.NodeProto | None:
    return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type else None
