"""Every use of a projection weight on hand-built graphs: calls of one module share a group, tied
uses under another module do not, weights behind Identity and a Reshape are found, uses through
anything else are listed, and biases are found for trained heads."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ortmux.worker.engine.lora.feeds import LoraWeights, RowSpan, build_feeds
from ortmux.worker.engine.lora.graph import rewrite
from ortmux.worker.engine.lora.targets import find_sites
from ortmux.worker.engine.lora.uses import call_path

RNG = np.random.default_rng(3)


def _model(nodes: list, initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_call_paths_drop_the_exporters_repeated_call_suffixes() -> None:
    assert (
        call_path("encoder.layer.0.attention.self.query_proj_1")
        == "encoder.layer.0.attention.self.query_proj"
    )
    assert call_path("albert_layers.0.attention_2.query_1") == "albert_layers.0.attention.query"
    assert call_path("h.0.mlp.c_fc") == "h.0.mlp.c_fc"


def test_a_tied_weight_under_another_module_is_a_group_of_its_own() -> None:
    w = RNG.standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="/encoder/proj/MatMul"),
        helper.make_node("MatMul", ["h", "w"], ["g"], name="/encoder/proj_1/MatMul"),
        helper.make_node("MatMul", ["g", "w"], ["y"], name="/head/MatMul"),
    ]
    report = find_sites(_model(nodes, {"w": w}))
    groups = [site.call_group for site in report.sites]
    assert groups[0] == groups[1] != groups[2]
    assert [site.module for site in report.sites] == ["encoder.proj", "encoder.proj_1", "head"]
    # The tied use takes no factors of an adapter that targets encoder.proj.
    _model_rewritten, inputs = rewrite(_model(nodes, {"w": w}), report)
    factors = LoraWeights(np.ones((8, 2), np.float32), np.ones((2, 8), np.float32))
    feeds = build_feeds(inputs, 2, [RowSpan(0, 2, {groups[0]: factors})])
    assert set(feeds) == {inputs[0].a, inputs[0].b, inputs[1].a, inputs[1].b}


def test_weights_behind_identity_and_a_reshape_are_found() -> None:
    flat = RNG.standard_normal(64).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["flat", "shape"], ["w2d"], name="/proj/Reshape"),
        helper.make_node("Identity", ["w2d"], ["w"], name="/proj/Identity"),
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0], name="/proj/Transpose"),
        helper.make_node("MatMul", ["x", "wt"], ["y"], name="/proj/MatMul"),
    ]
    shape = np.array([8, -1], np.int64)
    (site,) = find_sites(_model(nodes, {"flat": flat, "shape": shape})).sites
    assert (site.weight, site.weight_shape, site.transposed) == ("flat", (8, 8), True)
    assert (site.in_features, site.out_features, site.module) == (8, 8, "proj")


def test_a_use_through_a_non_no_op_is_listed_in_the_same_group() -> None:
    w = RNG.standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="/proj/MatMul"),
        helper.make_node("Mul", ["w", "two"], ["w2"], name="/proj_1/Mul"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="/proj_1/MatMul"),
    ]
    report = find_sites(_model(nodes, {"w": w, "two": np.array(2.0, np.float32)}))
    (site,) = report.sites
    (use,) = report.unadaptable
    assert (use.node, use.weight, use.group) == ("/proj_1/MatMul", "w", site.call_group)
    assert "through Mul, which is not a no-op" in use.reason


def test_a_projection_bias_is_found_through_identity_for_matmul_and_gemm() -> None:
    w = RNG.standard_normal((8, 8)).astype(np.float32)
    bias = RNG.standard_normal(8).astype(np.float32)
    nodes = [
        helper.make_node("Identity", ["b"], ["b_copy"]),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="/dense/MatMul"),
        helper.make_node("Add", ["b_copy", "h"], ["y"], name="/dense/Add"),
    ]
    (site,) = find_sites(_model(nodes, {"w": w, "b": bias})).sites
    assert site.bias == "b"
    model, (lora,) = rewrite(_model(nodes, {"w": w, "b": bias}))
    assert lora.bias and lora.bias in {value.name for value in model.graph.input}
