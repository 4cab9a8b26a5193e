"""LoRA sites through quantized projections on small hand-built graphs: the patterns the
quantizers write, the names they give, and the shapes a branch cannot take."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortmux.worker.engine.lora.naming import from_weight
from ortmux.worker.engine.lora.targets import find_sites
from ortmux.worker.engine.quantized_ops import replaced_by, stem

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])


def _model(nodes, initializers, output="y", out_features=4) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "quantized",
        [X],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", "seq", out_features])],
        initializer=initializers,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def _int8(name: str, shape=(8, 4)) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, np.int8), name)


def _scalar(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype), name)


def _dynamic(cast_and_mul: bool = True) -> onnx.ModelProto:
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node(
            "MatMulInteger", ["xq", "proj.weight_quantized", "xz", "w_zp"], ["acc"], name="proj/mm"
        ),
    ]
    if cast_and_mul:
        nodes += [
            helper.make_node("Mul", ["xs", "w_scale"], ["scale"]),
            helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["accf", "scale"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("Cast", ["acc"], ["y"], to=TensorProto.FLOAT))
    inits = [_int8("proj.weight_quantized"), _scalar("w_zp", 0, np.int8), _scalar("w_scale", 0.1, np.float32)]
    return _model(nodes, inits)


def test_dynamic_int8_site_reads_the_float_activation_and_adds_after_the_scale() -> None:
    report = find_sites(_dynamic())
    (site,) = report.sites
    assert (site.activation, site.output, site.weight) == ("x", "y", "proj.weight_quantized")
    assert (site.module, site.rule, site.quantized) == ("proj", "initializer", "MatMulInteger")
    assert (site.in_features, site.out_features, site.dtype) == (8, 4, TensorProto.FLOAT)


def test_an_int32_result_not_scaled_back_to_float_is_listed_as_unadaptable() -> None:
    report = find_sites(_dynamic(cast_and_mul=False))
    assert not report.sites
    (item,) = report.unadaptable
    assert item.op_type == "MatMulInteger" and "one Cast and one Mul" in item.reason
    assert item.module == "proj"


def test_matmulnbits_site_takes_its_features_from_the_attributes() -> None:
    node = helper.make_node(
        "MatMulNBits",
        ["x", "/layers.0/q_proj/MatMul_Q4", "scales"],
        ["y"],
        domain="com.microsoft",
        name="/layers.0/q_proj/MatMul_Q4",
        K=8,
        N=4,
        bits=4,
        block_size=8,
    )
    packed = numpy_helper.from_array(np.zeros((4, 1, 4), np.uint8), "/layers.0/q_proj/MatMul_Q4")
    report = find_sites(
        _model([node], [packed, numpy_helper.from_array(np.ones((4, 1), np.float32), "scales")])
    )
    (site,) = report.sites
    assert (site.in_features, site.out_features, site.quantized) == (8, 4, "MatMulNBits")
    assert (site.module, site.rule) == ("layers.0.q_proj", "node scope")


def test_qdq_site_reads_the_tensor_before_quantize_linear() -> None:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["fc.weight_quantized", "ws"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    inits = [
        _scalar("xs", 0.1, np.float32),
        _scalar("xz", 0, np.uint8),
        _int8("fc.weight_quantized"),
        _scalar("ws", 0.1, np.float32),
    ]
    (site,) = find_sites(_model(nodes, inits)).sites
    assert (site.activation, site.module, site.quantized, site.dtype) == ("x", "fc", "DequantizeLinear", 1)


def test_qoperator_projections_cannot_take_a_branch() -> None:
    node = helper.make_node(
        "QLinearMatMul", ["xq", "xs", "xz", "fc.weight_quantized", "ws", "wz", "ys", "yz"], ["yq"]
    )
    report = find_sites(_model([node], [_int8("fc.weight_quantized")], output="yq"))
    (item,) = report.unadaptable
    assert item.module == "fc" and "QOperator" in item.reason and not report.sites


@pytest.mark.parametrize(
    ("weight", "module"),
    [
        ("layers.0.q_proj.weight", "layers.0.q_proj"),
        ("layers.0.q_proj.weight_quantized", "layers.0.q_proj"),
        ("layers.0.q_proj.weight_t_quantized", "layers.0.q_proj"),
        ("layers.0.q_proj.weight_Q4", "layers.0.q_proj"),
        ("val_155_quantized", ""),
        ("layers.0.q_proj.weights", ""),
    ],
)
def test_module_from_a_quantized_weight_name(weight: str, module: str) -> None:
    assert from_weight(weight) == module


def test_the_weight_before_quantization_finds_its_replacement() -> None:
    quantized = {"fc.weight_t_quantized": "MatMulInteger", "fc2.weight_Q4": "MatMulNBits"}
    assert replaced_by("fc.weight", quantized) == "fc.weight_t_quantized"
    assert replaced_by("fc2.weight", quantized) == "fc2.weight_Q4"
    assert replaced_by("fc3.weight", quantized) is None
    assert stem("fc.weight_quantized") == "fc.weight"
