"""The LoRA rewrite: every adaptable projection gets a low-rank branch fed per run, per row.

    y = x @ W          becomes          y = x @ W + (x @ A_rows) @ B_rows

``A_rows`` [batch, in, rank] and ``B_rows`` [batch, rank, out] are graph inputs (the scale is
folded into B), so one run can give each row of the batch a different adapter, or none (zeros).
MatMul broadcasts the batch dimension. Rank is a free dimension: a batch pads its adapters to one
rank with zeros, which is exact. Each input has a default of rank 0 (an overridable initializer
of shape [1, in, 0]), so a run feeds only the branches its adapters touch and a base-only run
feeds none.
W stays a constant, so the optimizer still prepacks it.
"""

from __future__ import annotations

import dataclasses

import onnx
from onnx import helper

from ortmux.worker.adapters.targets import LoraSite, find_sites

REWRITE_VERSION = 2
RANK_DIM = "ortmux_lora_rank"
BATCH_DIM = "ortmux_batch"


@dataclasses.dataclass(frozen=True)
class LoraInput:
    """The two inputs that feed one site's branch."""

    site: LoraSite
    a: str
    b: str
    dtype: int  # onnx TensorProto data type of the weight

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> LoraInput:
        return cls(site=LoraSite(**values["site"]), a=values["a"], b=values["b"], dtype=int(values["dtype"]))


def _activation_ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    ranks = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            ranks[value.name] = len(value.type.tensor_type.shape.dim)
    return ranks


def has_batch_dimension(model: onnx.ModelProto) -> bool:
    """True when every graph input is at least 2-D with one shared, dynamic leading dimension."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    leading = set()
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) < 2 or dims[0].HasField("dim_value"):
            return False
        leading.add(dims[0].dim_param)
    return len(leading) == 1


def rewrite(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[LoraInput]]:
    """A copy of ``model`` with a branch on every site whose activation is [batch, seq, in], and
    the branches' inputs in site order. A model without a batch dimension is returned as is."""
    if not has_batch_dimension(model):
        return model, []
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    ranks = _activation_ranks(model)
    dtypes = {tensor.name: tensor.data_type for tensor in graph.initializer}
    nodes_by_name = {node.name: node for node in graph.node}
    inputs: list[LoraInput] = []
    extra_nodes: list[onnx.NodeProto] = []
    for index, site in enumerate(find_sites(model)):
        if ranks.get(site.activation) != 3 or site.node not in nodes_by_name:
            continue  # per-row branches need the batch as the activation's leading dimension
        prefix = f"ortmux.lora.{index}"
        lora = LoraInput(site, f"{prefix}.a", f"{prefix}.b", dtypes[site.weight])
        node = nodes_by_name[site.node]
        base_output = f"{site.output}.ortmux_base"
        node.output[0] = base_output
        down, delta = f"{prefix}.xa", f"{prefix}.delta"
        extra_nodes.append(
            helper.make_node("MatMul", [site.activation, lora.a], [down], name=f"{prefix}.down")
        )
        extra_nodes.append(helper.make_node("MatMul", [down, lora.b], [delta], name=f"{prefix}.up"))
        extra_nodes.append(helper.make_node("Add", [base_output, delta], [site.output], name=f"{prefix}.add"))
        graph.input.append(
            helper.make_tensor_value_info(lora.a, lora.dtype, [BATCH_DIM, site.in_features, RANK_DIM])
        )
        graph.input.append(
            helper.make_tensor_value_info(lora.b, lora.dtype, [BATCH_DIM, RANK_DIM, site.out_features])
        )
        # Defaults of rank 0 (overridable initializers): a run feeds only the branches it uses.
        graph.initializer.append(helper.make_tensor(lora.a, lora.dtype, [1, site.in_features, 0], []))
        graph.initializer.append(helper.make_tensor(lora.b, lora.dtype, [1, 0, site.out_features], []))
        inputs.append(lora)
    graph.node.extend(extra_nodes)
    _topological_sort(graph)
    return rewritten, inputs


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after the producers of its inputs (ONNX requires it)."""
    available = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        still = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                still.append(node)
        if len(still) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input near node '{still[0].name}'")
        pending = still
    del graph.node[:]
    graph.node.extend(ordered)
