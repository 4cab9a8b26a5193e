"""Paged attention: a decoder's attention rewritten to read and append to a KV cache held in
blocks (the worker's ``ortmux.PagedAttention``, engine/kernels/paged_attention.c), each row over
its own length.

The rewrite works on the optimized graphs of a model's cache entry, as the LoRA rewrite works on
projections. For every layer it finds ``Concat(past_key_values.N.key, k)`` -> ``present.N.key``
(and the value's), the product of the queries with the keys (``MatMul`` or ``FusedMatMul``,
scaled by constants on either side or after it) feeding a ``Softmax``, and the product of the
probabilities with the values; the last product is replaced by one ``PagedAttention`` node on
the queries and the new keys and values. What only fed the old attention (the past, the
attention mask's expansion, the causal mask) falls away; the present outputs go. The logits are
computed at each row's last real position only (``GatherND`` before the vocabulary projection).

A graph whose attention does not match, or whose rewrite does not reproduce the original's logits
on a probe (rows of different lengths, prefill then a step), keeps the dense path; the reason is
what ``GetModel`` and ``ortmux inspect`` say.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ortmux.worker.engine.decoder import DecoderSpec, find_decoder
from ortmux.worker.engine.kernels import DOMAIN
from ortmux.worker.engine.specs import TensorSpec

log = logging.getLogger(__name__)

BLOCK_TOKENS = 16  # the kernel's block size
PAGED_OP = f"{DOMAIN}.PagedAttention"
REWRITE_VERSION = 1
POOLS = "ortmux_kv_pools"  # int64 [layers, 3]: key pool, value pool addresses, blocks
TABLES = "ortmux_block_tables"  # int64 [rows, width]
LENS = "ortmux_kv_lens"  # int64 [rows, 2]: past length, real new tokens
LAST = "ortmux_last_index"  # int64 [rows, 1]: each row's last real position in this run
PROBE_TOLERANCE = 1e-4  # relative to the logits' largest magnitude

_LAYOUT = {"Unsqueeze", "Expand", "Reshape", "Transpose", "Identity", "Cast"}
_SCALE = {"Mul", "Div"}
_PRODUCTS = {"MatMul", "FusedMatMul"}
_SHAPE_ARITHMETIC = {
    "Shape",
    "Slice",
    "Gather",
    "Cast",
    "Sqrt",
    "Div",
    "Mul",
    "Squeeze",
    "Unsqueeze",
    "Reciprocal",
    "Pow",
    "Constant",
    "Concat",
    "Identity",
}


def kv_cache_path(model: onnx.ModelProto, window: int = 0) -> str:
    """What ``ortmux inspect`` says of a model file's KV cache: whether its attention is one the
    worker pages (checked again, on a probe, when a worker loads it) or why not."""
    decoder = find_decoder(
        [TensorSpec.from_onnx(value) for value in model.graph.input],
        [TensorSpec.from_onnx(value) for value in model.graph.output],
    )
    if isinstance(decoder, str):
        return f"none (it does not generate: {decoder})"
    if not decoder.position_ids:
        return "dense (it takes no position_ids)"
    try:
        rewrite(model, decoder, window)
    except NotPaged as exc:
        return f"dense ({exc})"
    return f"paged (its {decoder.layers} layers' attention rewritten to {PAGED_OP})"


class NotPaged(Exception):
    """Why a decoder keeps the dense path."""


@dataclasses.dataclass(frozen=True)
class PagedGraph:
    """What a rewritten graph takes beyond its model's inputs."""

    model: onnx.ModelProto
    inputs: tuple[str, ...]  # the model inputs it still reads (input_ids, position_ids, ...)
    last_index: bool  # whether it takes LAST (logits at each row's last position only)


def rewrite(model: onnx.ModelProto, decoder: DecoderSpec, window: int = 0) -> PagedGraph:
    """The paged form of ``model`` (not modified); NotPaged when its attention does not match."""
    graph = _Graph(model)
    nodes: list[onnx.NodeProto] = []
    params: list[onnx.TensorProto] = []
    replaced: set[str] = set()  # the outputs of the values' products, now PagedAttention's
    for layer in range(decoder.layers):
        found = graph.attention(decoder, layer)
        replaced.add(found.pv.output[0])
        name = f"ortmux_paged_params.{layer}"
        params.append(numpy_helper.from_array(np.array([found.scale, window, layer], np.float32), name))
        nodes.append(
            helper.make_node(
                "PagedAttention",
                [found.q, found.k, found.v, POOLS, TABLES, LENS, name],
                [found.pv.output[0]],
                name=f"ortmux_paged_attention.{layer}",
                domain=DOMAIN,
            )
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    for node in model.graph.node:
        if not (node.op_type in _PRODUCTS and node.output[0] in replaced):
            out.graph.node.append(node)
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(params)
    cache = {name for pair in decoder.cache_names() for name in pair}
    kept_outputs = [value for value in model.graph.output if value.name not in cache]
    del out.graph.output[:]
    out.graph.output.extend(kept_outputs)
    last_index = _last_positions(out, decoder)
    _prune(out)
    used = {name for node in out.graph.node for name in node.input}
    past = sorted(name for name in used if name.startswith("past_key_values."))
    if past:
        raise NotPaged(f"its past {past[0]} is read outside attention")
    extra = [
        helper.make_tensor_value_info(POOLS, TensorProto.INT64, [decoder.layers, 3]),
        helper.make_tensor_value_info(TABLES, TensorProto.INT64, ["rows", "blocks"]),
        helper.make_tensor_value_info(LENS, TensorProto.INT64, ["rows", 2]),
    ]
    if last_index:
        extra.append(helper.make_tensor_value_info(LAST, TensorProto.INT64, ["rows", 1]))
    inputs = [value for value in model.graph.input if value.name in used and value.name not in cache]
    del out.graph.input[:]
    out.graph.input.extend([*inputs, *extra])
    if not any(opset.domain == DOMAIN for opset in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    initializers = {tensor.name for tensor in out.graph.initializer}
    return PagedGraph(out, tuple(v.name for v in inputs if v.name not in initializers), last_index)


@dataclasses.dataclass(frozen=True)
class _Attention:
    q: str
    k: str
    v: str
    pv: onnx.NodeProto
    scale: float


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for node in model.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.constants = {tensor.name: tensor for tensor in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t

    def scalar(self, name: str) -> float | None:
        tensor = self.constants.get(name)
        if tensor is None:
            return None
        array = numpy_helper.to_array(tensor)
        return float(array.reshape(-1)[0]) if array.size == 1 else None

    def attention(self, decoder: DecoderSpec, layer: int) -> _Attention:
        k = self._appended(decoder.past(layer, "key"), decoder.present(layer, "key"))
        v = self._appended(decoder.past(layer, "value"), decoder.present(layer, "value"))
        qk, k_scale, k_slot = self._product(decoder.present(layer, "key"))
        pv, _v_scale, v_slot = self._product(decoder.present(layer, "value"))
        if k_slot != 1 or v_slot != 1:
            raise NotPaged(f"layer {layer}'s keys or values enter their product on the left")
        q, q_scale = self._unscaled(qk.input[0])
        scale = k_scale * q_scale * _alpha(qk) * self._to_softmax(qk, pv)
        if math.isnan(scale):
            scale = decoder.head_dim**-0.5
        return _Attention(q=q, k=k, v=v, pv=pv, scale=scale)

    def _appended(self, past: str, present: str) -> str:
        node = self.producer.get(present)
        if node is None or node.op_type != "Concat" or list(node.input[:1]) != [past] or len(node.input) != 2:
            raise NotPaged(f"{present} is not Concat({past}, new)")
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        if axis not in (2, -2):
            raise NotPaged(f"{present} concatenates along axis {axis}, not the positions'")
        return node.input[1]

    def _product(self, start: str) -> tuple[onnx.NodeProto, float, int]:
        """The one product the cache tensor ``start`` reaches through layout and scaling nodes,
        the constant factor met on the way, and which of the product's inputs it is."""
        found: list[tuple[onnx.NodeProto, float, int]] = []
        stack = [(start, 1.0)]
        seen: set[str] = set()
        while stack:
            name, factor = stack.pop()
            for node in self.consumers.get(name, []):
                if node.output[0] in seen:
                    continue
                seen.add(node.output[0])
                if node.op_type in _PRODUCTS:
                    found.append((node, factor, list(node.input).index(name)))
                elif node.op_type in _LAYOUT and node.input[0] == name:
                    stack.append((node.output[0], factor))
                elif node.op_type in _SCALE and node.input[0] == name:
                    stack.append((node.output[0], self._scaled(factor, node)))
        if len(found) != 1:
            raise NotPaged(f"{start} reaches {len(found)} products, not one")
        return found[0]

    def _unscaled(self, name: str) -> tuple[str, float]:
        factor = 1.0
        while (node := self.producer.get(name)) is not None and node.op_type in _SCALE:
            if self.scalar(node.input[1]) is None and not self._from_shapes(node.input[1]):
                break
            factor = self._scaled(factor, node)
            name = node.input[0]
        return name, factor

    def _scaled(self, factor: float, node: onnx.NodeProto) -> float:
        """``factor`` times what Mul / Div ``node`` scales by: a constant, or NaN for a factor
        computed from shapes alone (GPT-2's 1 / sqrt(head_dim) from its queries' shape); the
        scale is then taken to be 1 / sqrt(head_dim), which the probe checks."""
        value = self.scalar(node.input[1])
        if value is None:
            if not self._from_shapes(node.input[1]):
                raise NotPaged(f"{node.name or node.op_type} scales attention by a tensor's values")
            return math.nan
        return factor * value if node.op_type == "Mul" else factor / value

    def _from_shapes(self, name: str) -> bool:
        """Whether ``name`` is computed from constants and tensors' shapes only."""
        stack, seen = [name], set()
        while stack:
            current = stack.pop()
            if current in seen or current in self.constants:
                continue
            seen.add(current)
            node = self.producer.get(current)
            if node is None or node.op_type not in _SHAPE_ARITHMETIC:
                return False
            if node.op_type != "Shape":
                stack.extend(node.input)
        return True

    def _to_softmax(self, qk: onnx.NodeProto, pv: onnx.NodeProto) -> float:
        """The constant factor between the scores and their Softmax (masks added on the way are
        the old attention's); the probabilities must reach ``pv``."""
        factor, name = 1.0, qk.output[0]
        while True:
            users = self.consumers.get(name, [])
            if len(users) != 1:
                raise NotPaged(f"the scores of {qk.name or 'a product'} have {len(users)} users")
            node = users[0]
            if node.op_type == "Softmax":
                break
            if node.op_type in _SCALE and node.input[0] == name:
                factor = self._scaled(factor, node)
            elif node.op_type not in {"Add", "Where", "Cast"}:
                raise NotPaged(f"the scores pass through {node.op_type} before their Softmax")
            name = node.output[0]
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if axis not in (-1, 3):
            raise NotPaged(f"the Softmax runs along axis {axis}, not the keys'")
        probabilities, reached = node.output[0], False
        for _ in range(8):
            if probabilities == pv.input[0]:
                reached = True
                break
            users = self.consumers.get(probabilities, [])
            nexts = [u for u in users if u.op_type in {"Where", "Cast", "Identity"}]
            if not nexts:
                break
            probabilities = nexts[0].output[0]
        if not reached:
            raise NotPaged("the Softmax's probabilities do not reach the values' product")
        return factor


def _alpha(node: onnx.NodeProto) -> float:
    attributes = {a.name: a for a in node.attribute}
    if node.op_type == "FusedMatMul":
        if attributes.get("transA") and attributes["transA"].i:
            raise NotPaged("the queries enter their product transposed")
        return attributes["alpha"].f if "alpha" in attributes else 1.0
    return 1.0


def _last_positions(model: onnx.ModelProto, decoder: DecoderSpec) -> bool:
    """Gather each row's last real position before the vocabulary projection (``LAST``), so a
    prefill computes one row of logits per sequence, not one per token. False when the logits'
    producer is not a projection of the hidden states (the runner picks the rows then)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    node = producer.get(decoder.logits)
    while node is not None and node.op_type == "Identity":
        node = producer.get(node.input[0])
    if node is None or node.op_type not in {"MatMul", "LoraBranch"}:
        return False
    hidden = node.input[0]
    if node.op_type == "LoraBranch":
        base = producer.get(node.input[1])
        if base is None or base.op_type != "MatMul" or base.input[0] != hidden:
            return False
    gathered = f"{hidden}.ortmux_last"
    picked = f"{hidden}.ortmux_picked"
    axes = "ortmux_last_axes"
    for each in model.graph.node:
        for i, name in enumerate(each.input):
            if name == hidden:
                each.input[i] = gathered
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), axes))
    model.graph.node.extend(
        [
            helper.make_node("GatherND", [hidden, LAST], [picked], batch_dims=1, name="ortmux_last.gather"),
            helper.make_node("Unsqueeze", [picked, axes], [gathered], name="ortmux_last.unsqueeze"),
        ]
    )
    return True


def _prune(model: onnx.ModelProto) -> None:
    """Drop the nodes no graph output depends on (and initializers no node reads), in order."""
    nodes = list(model.graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    needed: set[int] = set()
    stack = [value.name for value in model.graph.output]
    while stack:
        index = producer.get(stack.pop())
        if index is None or index in needed:
            continue
        needed.add(index)
        stack.extend(nodes[index].input)
    nodes = [node for i, node in enumerate(nodes) if i in needed]
    del model.graph.node[:]
    model.graph.node.extend(_topological(nodes))
    used = {name for node in model.graph.node for name in node.input}
    kept = [tensor for tensor in model.graph.initializer if tensor.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _topological(nodes: Sequence[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    produced_by = {out: i for i, node in enumerate(nodes) for out in node.output}
    done: set[int] = set()
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            index, expanded = stack.pop()
            if index in done:
                continue
            if expanded:
                done.add(index)
                yield nodes[index]
                continue
            stack.append((index, True))
            for name in nodes[index].input:
                dep = produced_by.get(name)
                if dep is not None and dep not in done:
                    stack.append((dep, False))


def save_atomic(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` beside its data file so a reader sees all of it or nothing."""
    handle, scratch = tempfile.mkstemp(prefix=".paged-", suffix=".onnx", dir=path.parent)
    os.close(handle)
    try:
        onnx.save(model, scratch)
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


def max_difference(dense: np.ndarray, paged: np.ndarray) -> float:
    """The largest difference, relative to the dense logits' largest magnitude."""
    return float(np.abs(dense - paged).max() / max(1.0, float(np.abs(dense).max())))
