"""The LoRA kernel (engine/kernels/lora_branch.c) in a real ONNX Runtime session, against numpy.

The library declares the few ONNX Runtime C API entries it uses by their index in the API's
function table. Every one of them is exercised here: registration (domain, op, session options),
reading the inputs' shapes and data, the output, ParallelFor (runs of many rows and tokens) and
the error status (bad tables). A wrong index fails these tests.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ortmux.worker.engine import kernels
from ortmux.worker.engine.lora.feeds import Factors, LoraWeights, RowSpan, address_rows, kernel_feeds
from ortmux.worker.engine.lora.graph import LoraInput
from ortmux.worker.engine.lora.sites import LoraSite
from ortmux.worker.engine.runtime import RuntimeOptions

IN, OUT = 24, 40


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    library = kernels.library()
    assert library is not None, "the kernel must build on a machine with a C compiler"
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", "tokens", IN]),
        helper.make_tensor_value_info("base", TensorProto.FLOAT, ["flat", OUT]),
        helper.make_tensor_value_info("table", TensorProto.INT64, ["table_rows", 4]),
    ]
    node = helper.make_node("LoraBranch", ["x", "base", "table"], ["y"], domain=kernels.DOMAIN)
    graph = helper.make_graph(
        [node], "kernel", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)]
    )
    model.ir_version = 9
    runtime = RuntimeOptions(providers=("CPUExecutionProvider",))
    assert runtime.lora_branch_in_force() == "kernel"
    options = runtime.session_options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)  # registers it
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _weights(rng: np.random.Generator, rank: int, bias: bool) -> LoraWeights:
    return LoraWeights(
        a=rng.standard_normal((IN, rank)).astype(np.float32),
        b=rng.standard_normal((rank, OUT)).astype(np.float32),
        bias=rng.standard_normal(OUT).astype(np.float32) if bias else None,
    )


def _row(weights: LoraWeights | None) -> list[int]:
    if weights is None:
        return [0, 0, 0, 0]
    bias = weights.bias.ctypes.data if weights.bias is not None else 0
    return [weights.a.ctypes.data, weights.b.ctypes.data, weights.rank, bias]


@pytest.mark.parametrize("tokens", [1, 7, 37])
def test_each_row_gets_its_own_factors_read_in_place(session: ort.InferenceSession, tokens: int) -> None:
    rng = np.random.default_rng(tokens)
    plan = [_weights(rng, 4, False), None, _weights(rng, 16, True), _weights(rng, 128, True), None]
    x = rng.standard_normal((len(plan), tokens, IN)).astype(np.float32)
    base = rng.standard_normal((len(plan) * tokens, OUT)).astype(np.float32)
    table = np.array([_row(w) for w in plan], np.int64)
    (y,) = session.run(None, {"x": x, "base": base, "table": table})
    assert y.shape == base.shape
    want = base.reshape(len(plan), tokens, OUT).copy()
    for row, weights in enumerate(plan):
        if weights is not None:
            want[row] += x[row] @ weights.a @ weights.b + (weights.bias if weights.bias is not None else 0)
    np.testing.assert_allclose(y.reshape(want.shape), want, rtol=1e-5, atol=1e-4)
    # a row's result does not depend on its batch-mates
    (alone,) = session.run(None, {"x": x[2:3], "base": base[2 * tokens : 3 * tokens], "table": table[2:3]})
    np.testing.assert_array_equal(alone, y[2 * tokens : 3 * tokens])


def test_one_table_row_serves_every_row(session: ort.InferenceSession) -> None:
    rng = np.random.default_rng(1)
    weights = _weights(rng, 8, True)
    x = rng.standard_normal((3, 5, IN)).astype(np.float32)
    base = np.zeros((15, OUT), np.float32)
    (y,) = session.run(None, {"x": x, "base": base, "table": np.array([_row(weights)], np.int64)})
    want = x.reshape(15, IN) @ weights.a @ weights.b + weights.bias
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)


def test_an_empty_run(session: ort.InferenceSession) -> None:
    empty = {"x": np.zeros((0, 3, IN), np.float32), "base": np.zeros((0, OUT), np.float32)}
    (y,) = session.run(None, {**empty, "table": np.zeros((1, 4), np.int64)})
    assert y.shape == (0, OUT)


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"table": np.zeros((2, 4), np.int64)}, "one row per row of x"),
        ({"table": np.array([[1, 0, 4, 0]] * 3, np.int64)}, "A without B"),
        ({"table": np.array([[1, 1, -1, 0]] * 3, np.int64)}, "rank out of range"),
        ({"base": np.zeros((5, OUT), np.float32)}, "one output per token"),
    ],
)
def test_bad_tables_and_shapes_are_refused(session: ort.InferenceSession, feeds: dict, message: str) -> None:
    good = {
        "x": np.zeros((3, 2, IN), np.float32),
        "base": np.zeros((6, OUT), np.float32),
        "table": np.zeros((3, 4), np.int64),
    }
    with pytest.raises(Exception, match=message):
        session.run(None, {**good, **feeds})
    session.run(None, good)  # and the session serves on


def _site(group: str, per_row: bool = True) -> LoraSite:
    return LoraSite(
        weight=f"{group}.weight",
        module=group,
        node=group,
        activation="x",
        output="y",
        in_features=IN,
        out_features=OUT,
        per_row=per_row,
    )


def test_tables_are_built_once_per_adapter_and_name_its_arrays() -> None:
    rng = np.random.default_rng(2)
    inputs = [LoraInput(_site(g), "", "", TensorProto.FLOAT, table=f"t{g}") for g in ("q", "v", "o")]
    first, second = (
        Factors({"q.weight": _weights(rng, 4, False)}),
        Factors({"v.weight": _weights(rng, 8, True)}),
    )
    rows = address_rows(first, inputs)
    assert rows[0].tolist() == _row(first["q.weight"]) and not rows[1:].any()
    assert address_rows(first, inputs) is rows  # cached on the adapter's factors
    feeds = kernel_feeds(inputs, 4, [RowSpan(0, 1, first), RowSpan(2, 4, second)])
    assert sorted(feeds) == ["tq", "tv"]  # "o": no adapter of the run touches it, the default serves
    assert feeds["tq"].tolist() == [_row(first["q.weight"]), [0] * 4, [0] * 4, [0] * 4]
    assert feeds["tv"].tolist() == [[0] * 4, [0] * 4, _row(second["v.weight"]), _row(second["v.weight"])]


def test_a_shared_activation_takes_one_adapter_for_the_whole_run() -> None:
    rng = np.random.default_rng(3)
    inputs = [LoraInput(_site("rel", per_row=False), "", "", TensorProto.FLOAT, table="t")]
    factors = Factors({"rel.weight": _weights(rng, 4, False)})
    assert kernel_feeds(inputs, 3, [RowSpan(0, 3, factors)])["t"].shape == (1, 4)
    with pytest.raises(ValueError, match="shared by every row"):
        kernel_feeds(inputs, 3, [RowSpan(0, 2, factors)])
