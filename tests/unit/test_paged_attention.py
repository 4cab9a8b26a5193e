"""The paged attention kernel (engine/kernels/paged_attention.c) in a real ONNX Runtime session,
against numpy: new keys and values land in each row's blocks, every query attends over its own
row's positions only (causal, grouped heads, a sliding window), padding tokens are neither
written nor attended, and block tables that point outside the pool are refused."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ortmux.worker.engine import kernels
from ortmux.worker.engine.runtime import RuntimeOptions

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 16, 16


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    assert kernels.library() is not None, "the kernels must build on a machine with a C compiler"
    names = ["q", "k", "v", "pools", "tables", "lens", "params"]
    types = [TensorProto.FLOAT] * 3 + [TensorProto.INT64] * 3 + [TensorProto.FLOAT]
    inputs = [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types, strict=True)]
    node = helper.make_node("PagedAttention", names, ["out"], domain=kernels.DOMAIN)
    graph = helper.make_graph(
        [node], "paged", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)]
    )
    model.ir_version = 9
    runtime = RuntimeOptions(providers=("CPUExecutionProvider",))
    options = runtime.session_options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _reference(q, keys, values, scale, window):
    """One row's attention: q [heads, n, dim] at the last n of len(keys) positions."""
    total, n = keys.shape[1], q.shape[1]
    group = HEADS // KV_HEADS
    out = np.zeros_like(q)
    for head in range(HEADS):
        k, v = keys[head // group], values[head // group]
        for i in range(n):
            pos = total - n + i
            first = max(0, pos - window + 1) if window else 0
            s = (k[first : pos + 1] @ q[head, i]) * scale
            p = np.exp(s - s.max())
            out[head, i] = (p / p.sum()) @ v[first : pos + 1]
    return out


@pytest.mark.parametrize("window", [0, 5])
def test_rows_attend_over_their_own_blocks(session: ort.InferenceSession, window: int) -> None:
    rng = np.random.default_rng(window)
    blocks = 12
    kpool = rng.standard_normal((blocks, KV_HEADS, BLOCK, DIM)).astype(np.float32)
    vpool = rng.standard_normal((blocks, KV_HEADS, BLOCK, DIM)).astype(np.float32)
    pools = np.array([[0, 0, 0], [kpool.ctypes.data, vpool.ctypes.data, blocks]], np.int64)
    # (past length, real new tokens, block ids): rows of different lengths, one padded
    plan = [(0, 3, [5]), (17, 1, [2, 9]), (30, 3, [0, 7, 3]), (5, 1, [11])]
    tokens = 3
    tables = np.zeros((len(plan), 3), np.int64)
    for row, (_past, _real, ids) in enumerate(plan):
        tables[row, : len(ids)] = ids
    lens = np.array([[past, real] for past, real, _ids in plan], np.int64)
    q = rng.standard_normal((len(plan), HEADS, tokens, DIM)).astype(np.float32)
    k = rng.standard_normal((len(plan), KV_HEADS, tokens, DIM)).astype(np.float32)
    v = rng.standard_normal((len(plan), KV_HEADS, tokens, DIM)).astype(np.float32)
    before_k, before_v = kpool.copy(), vpool.copy()
    scale = DIM**-0.5
    params = np.array([scale, window, 1], np.float32)
    (out,) = session.run(None, dict(q=q, k=k, v=v, pools=pools, tables=tables, lens=lens, params=params))
    assert out.shape == q.shape
    for row, (past, real, ids) in enumerate(plan):
        keys = _history(kpool, before_k, k[row], ids, past, real)
        values = _history(vpool, before_v, v[row], ids, past, real)
        want = _reference(q[row, :, :real], keys, values, scale, window)
        np.testing.assert_allclose(out[row, :, :real], want, rtol=1e-5, atol=1e-6)
        assert not out[row, :, real:].any()  # padding gets no output
    untouched = sorted(set(range(blocks)) - {i for _p, _r, ids in plan for i in ids})
    np.testing.assert_array_equal(kpool[untouched], before_k[untouched])


def _history(pool, before, new, ids, past, real):
    """A row's positions as its blocks hold them after the run, checked: the new ones written in
    place, the past ones untouched."""
    flat = np.concatenate([before[i] for i in ids], axis=1)[:, : past + real]  # [kv, len, dim]
    written = np.concatenate([pool[i] for i in ids], axis=1)[:, : past + real]
    np.testing.assert_array_equal(written[:, past:], new[:, :real])
    np.testing.assert_array_equal(written[:, :past], flat[:, :past])
    return written


def test_tables_outside_the_pool_are_refused(session: ort.InferenceSession) -> None:
    kpool = np.zeros((2, KV_HEADS, BLOCK, DIM), np.float32)
    vpool = np.zeros_like(kpool)
    pools = np.array([[kpool.ctypes.data, vpool.ctypes.data, 2]], np.int64)
    q = np.zeros((1, HEADS, 1, DIM), np.float32)
    kv = np.zeros((1, KV_HEADS, 1, DIM), np.float32)
    params = np.array([1.0, 0, 0], np.float32)
    feeds = dict(q=q, k=kv, v=kv, pools=pools, params=params)
    cases = {
        "block id is out of the pool": (np.array([[2]], np.int64), np.array([[0, 1]], np.int64)),
        "too short for its length": (np.array([[0]], np.int64), np.array([[16, 1]], np.int64)),
        "lengths are out of range": (np.array([[0]], np.int64), np.array([[0, 2]], np.int64)),
    }
    for message, (tables, lens) in cases.items():
        with pytest.raises(Exception, match=message):
            session.run(None, {**feeds, "tables": tables, "lens": lens})
    with pytest.raises(Exception, match="no pool for this layer"):
        session.run(
            None,
            {
                **feeds,
                "tables": np.array([[0]], np.int64),
                "lens": np.array([[0, 1]], np.int64),
                "params": np.array([1.0, 0, 3], np.float32),
            },
        )
