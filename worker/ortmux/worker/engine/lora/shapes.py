"""Tensor shapes of a graph, symbolic where possible: where a LoRA branch can read and how."""

from __future__ import annotations

import logging

import onnx

log = logging.getLogger(__name__)


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return []
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value.type.tensor_type.shape.dim
    ]


def infer_shapes(model: onnx.ModelProto) -> dict[str, list[str | int]]:
    """Tensor name -> dims (ints, or symbols such as ``batch_size*sequence_length``).

    ONNX Runtime's symbolic shape inference follows Shape/Slice/Concat chains that exporters use to
    flatten activations; where it fails, ONNX's own inference is used."""
    inferred = None
    try:
        inferred = _symbolic_shapes(model)
    except Exception as exc:  # a graph it cannot follow; ONNX's inference still gives ranks
        log.info("symbolic shape inference failed (%s); using ONNX shape inference", exc)
    if inferred is None:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    return {value.name: _dims(value) for value in [*graph.value_info, *graph.input, *graph.output]}


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX Runtime's symbolic shape inference, or None where it does not infer every shape.

    Its ``infer_shapes`` saves the model with its weights into the working directory before it
    reports an incomplete inference (``sym_shape_infer_temp.onnx``, a copy of every weight), which
    a worker must never do; so its steps are run here, without that save."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference, get_opset

    opset = get_opset(model)
    if not opset or opset < 7:
        return None
    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess rank, verbose
    inference._preprocess(model)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    if not complete:
        log.info("symbolic shape inference left shapes unknown; using ONNX shape inference")
        return None
    return inference.out_mp_


def batch_symbol(model: onnx.ModelProto) -> str:
    """The dim_param every non-initializer graph input leads with ("" when there is none)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    leading = set()
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) < 2 or dims[0].HasField("dim_value") or not dims[0].dim_param:
            return ""
        leading.add(dims[0].dim_param)
    return leading.pop() if len(leading) == 1 else ""
