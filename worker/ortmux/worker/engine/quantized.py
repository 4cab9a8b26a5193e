"""Quantized weights of a graph: which initializers quantized operators read, and which original
weight each replaced (the quantizers rename them: ``<weight>_quantized``, ``<weight>_Q4``, ...)."""

from __future__ import annotations

import collections

import onnx

# Quantized operator -> the input that carries its quantized weight.
WEIGHT_INPUT = {
    "MatMulInteger": 1,
    "DynamicQuantizeMatMul": 1,
    "MatMulNBits": 1,
    "QLinearMatMul": 3,
    "QGemm": 3,
    "ConvInteger": 1,
    "QLinearConv": 3,
    "DequantizeLinear": 0,
}
PROJECTIONS = frozenset({"MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits", "QLinearMatMul", "QGemm"})
_SUFFIXES = ("_quantized", "_Q4", "_Q8", "_q4", "_q8", "_quant")


def quantized_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Initializer -> the quantized operator that reads it as its weight."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    found: dict[str, str] = {}
    for node in model.graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] in initializers:
            found.setdefault(node.input[index], node.op_type)
    return found


def replaced_by(name: str, quantized: dict[str, str]) -> str | None:
    """The quantized initializer that took the place of weight ``name``, if one did."""
    if name in quantized:
        return name
    for candidate in sorted(quantized):
        stem = candidate
        for suffix in _SUFFIXES:
            stem = stem.removesuffix(suffix)
        if stem == name or stem.startswith(f"{name}_"):
            return candidate
    return None


def projection_counts(quantized: dict[str, str]) -> dict[str, int]:
    """Quantized projections by operator (MatMulInteger: 13, ...)."""
    return dict(sorted(collections.Counter(op for op in quantized.values() if op in PROJECTIONS).items()))
