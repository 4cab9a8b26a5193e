"""The LoRA rewrite: every adaptable projection gets a low-rank branch fed per run, per row.

    y = x @ W          becomes          y = x @ W + (x @ A_rows) @ B_rows

``A_rows`` [batch, in, rank] and ``B_rows`` [batch, rank, out] are graph inputs (the scale is
folded into B), so one run can give each row of the batch a different adapter, or none (zeros).
A projection with a bias gets a third input, a per-row bias delta [batch, 1, out] added to the
branch, so an adapter that trained the whole layer (PEFT's ``modules_to_save``) is served as the
exact delta ``x @ (W' - W) + (b' - b)``, with ``W' - W`` factored as ``A @ B``.
MatMul broadcasts the batch dimension. Rank is a free dimension: a batch pads its adapters to one
rank with zeros, which is exact. Each input has a default of rank 0 (an overridable initializer
of shape [1, in, 0]; zeros for a bias), so a run feeds only the branches its adapters touch and a
base-only run feeds none.
W stays a constant, so the optimizer still prepacks it.

With the worker's own kernel (``branch="kernel"``, engine/kernels) each site is instead one
``ortmux.LoraBranch(x, x @ W, table)`` node: ``table`` [batch or 1, 4] gives each row the
addresses of its adapter's A and B where the adapter keeps them, its rank and its bias delta, so a
run copies no factors (docs/lora-kernel.md). Its default, one row of zeros, is no branch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ortmux.worker.engine.kernels import DOMAIN, OP
from ortmux.worker.engine.lora.shapes import batch_symbol
from ortmux.worker.engine.lora.targets import ROWS, LoraSite, SiteReport, find_sites

REWRITE_VERSION = 5
# Each site's rank is a dimension of its own: runs feed the sites different ranks (0 where no
# adapter of the run touches one), and ONNX Runtime plans buffer reuse on equal dimension names.
RANK_DIM = "ortmux_lora_rank"
BATCH_DIM = "ortmux_batch"
TABLE_DIM = "ortmux_lora_rows"
BRANCHES = ("matmul", "kernel")


@dataclasses.dataclass(frozen=True)
class LoraInput:
    """The inputs that feed one site's branch: A, B (and the bias delta) per row, or with the
    kernel the table of the rows' factor addresses."""

    site: LoraSite
    a: str
    b: str
    dtype: int  # onnx TensorProto data type of the weight
    bias: str = ""  # the per-row bias delta's input, where the projection has a bias
    table: str = ""  # the kernel's per-row address table (then a, b and bias are "")

    @property
    def names(self) -> tuple[str, ...]:
        """Every graph input of this branch (none of them a client may feed)."""
        return tuple(name for name in (self.a, self.b, self.bias, self.table) if name)

    @property
    def middle_dims(self) -> int:
        """Singleton dimensions between the batch and the factor's matrix in the fed shape, so
        that the factors broadcast over the activation's inner dimensions ([batch, 1, in, R] for
        a [batch, h, w, in] activation)."""
        return 0 if self.site.layout != ROWS else max(self.site.source_rank - 3, 0)

    @property
    def bias_ones(self) -> int:
        """Singleton dimensions between the batch and the features in the bias delta's shape."""
        return max(self.site.source_rank - 2, 1) if self.site.layout == ROWS else 1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> LoraInput:
        return cls(
            site=LoraSite.from_json(values["site"]),
            a=values["a"],
            b=values["b"],
            dtype=int(values["dtype"]),
            bias=values.get("bias", ""),
            table=values.get("table", ""),
        )


def has_batch_dimension(model: onnx.ModelProto) -> bool:
    """True when every graph input is at least 2-D with one shared, dynamic leading dimension."""
    return bool(batch_symbol(model))


def kernel_serves(sites: list[LoraSite], dtypes: dict[str, int]) -> bool:
    """The kernel computes in float32: a model with a branch of another type uses MatMul."""
    return all((site.dtype or dtypes[site.weight]) == TensorProto.FLOAT for site in sites)


def rewrite(
    model: onnx.ModelProto, report: SiteReport | None = None, branch: str = "matmul"
) -> tuple[onnx.ModelProto, list[LoraInput]]:
    """A copy of ``model`` with a branch on every adaptable site, and the branches' inputs in site
    order. A model without a batch dimension is returned as is. ``branch`` is "matmul" or
    "kernel" (the caller has checked the kernel's library loads); a model the kernel does not
    serve (:func:`kernel_serves`) gets MatMul branches, which its inputs show (no ``table``)."""
    if not has_batch_dimension(model):
        return model, []
    report = report or find_sites(model)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    dtypes = {tensor.name: tensor.data_type for tensor in graph.initializer}
    nodes = list(graph.node)
    inputs: list[LoraInput] = []
    extra_nodes: list[onnx.NodeProto] = []
    if branch == "kernel" and not kernel_serves(report.sites, dtypes):
        branch = "matmul"  # the kernel computes float32 only
    if branch == "kernel":
        rewritten.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    for index, site in enumerate(report.sites):
        prefix = f"ortmux.lora.{index}"
        base_output, source = _branch_point(graph, nodes[site.node_index], site, prefix, extra_nodes)
        if branch == "kernel":
            inputs.append(_kernel_branch(graph, site, prefix, index, base_output, source, extra_nodes))
            continue
        bias = f"{prefix}.bias" if site.bias else ""
        lora = LoraInput(site, f"{prefix}.a", f"{prefix}.b", site.dtype or dtypes[site.weight], bias)
        down, delta = f"{prefix}.xa", f"{prefix}.delta"
        extra_nodes.append(helper.make_node("MatMul", [source, lora.a], [down], name=f"{prefix}.down"))
        rows = delta if site.layout == ROWS else f"{delta}.rows"
        up = f"{prefix}.xab" if bias else rows
        extra_nodes.append(helper.make_node("MatMul", [down, lora.b], [up], name=f"{prefix}.up"))
        if bias:
            extra_nodes.append(helper.make_node("Add", [up, bias], [rows], name=f"{prefix}.bias_add"))
            ones = [1] * lora.bias_ones
            graph.input.append(
                helper.make_tensor_value_info(bias, lora.dtype, [BATCH_DIM, *ones, site.out_features])
            )
            zeros = np.zeros([1, *ones, site.out_features], helper.tensor_dtype_to_np_dtype(lora.dtype))
            graph.initializer.append(numpy_helper.from_array(zeros, bias))
        if site.layout != ROWS:  # back to the projection's 2-D [rows, out]
            shape = f"{prefix}.out_shape"
            graph.initializer.append(
                helper.make_tensor(shape, TensorProto.INT64, [2], [-1, site.out_features])
            )
            extra_nodes.append(
                helper.make_node("Reshape", [f"{delta}.rows", shape], [delta], name=f"{prefix}.flat")
            )
        extra_nodes.append(helper.make_node("Add", [base_output, delta], [site.output], name=f"{prefix}.add"))
        middle, rank = [1] * lora.middle_dims, f"{RANK_DIM}_{index}"
        graph.input.append(
            helper.make_tensor_value_info(lora.a, lora.dtype, [BATCH_DIM, *middle, site.in_features, rank])
        )
        graph.input.append(
            helper.make_tensor_value_info(lora.b, lora.dtype, [BATCH_DIM, *middle, rank, site.out_features])
        )
        # Defaults of rank 0 (overridable initializers): a run feeds only the branches it uses.
        graph.initializer.append(
            helper.make_tensor(lora.a, lora.dtype, [1, *middle, site.in_features, 0], [])
        )
        graph.initializer.append(
            helper.make_tensor(lora.b, lora.dtype, [1, *middle, 0, site.out_features], [])
        )
        inputs.append(lora)
    graph.node.extend(extra_nodes)
    _topological_sort(graph)
    return rewritten, inputs


def _branch_point(
    graph: onnx.GraphProto,
    node: onnx.NodeProto,
    site: LoraSite,
    prefix: str,
    extra_nodes: list[onnx.NodeProto],
) -> tuple[str, str]:
    """Where a site's branch joins: the projection's output renamed to its base product (the
    branch writes the original name), and the activation the branch reads, as rows. [batch, in]
    becomes [batch, 1, in], and [batch, ..., in] that a Reshape flattened becomes [batch, rows, in]:
    each request's rows meet its own factors. Returns (base output, activation)."""
    base_output = f"{site.output}.ortmux_base"
    node.output[0] = base_output
    if site.layout == ROWS:
        return base_output, site.activation
    source = f"{prefix}.rows"
    graph.initializer.append(
        helper.make_tensor(f"{prefix}.rows_shape", TensorProto.INT64, [3], [0, -1, site.in_features])
    )
    extra_nodes.append(
        helper.make_node("Reshape", [site.activation, f"{prefix}.rows_shape"], [source], name=source)
    )
    return base_output, source


def _kernel_branch(
    graph: onnx.GraphProto,
    site: LoraSite,
    prefix: str,
    index: int,
    base_output: str,
    source: str,
    extra_nodes: list[onnx.NodeProto],
) -> LoraInput:
    """One LoraBranch node computing the site's output from its activation (as rows), the base
    product and the run's address table; the output takes the base product's shape."""
    lora = LoraInput(site, "", "", TensorProto.FLOAT, table=f"{prefix}.table")
    extra_nodes.append(
        helper.make_node(
            OP, [source, base_output, lora.table], [site.output], name=f"{prefix}.branch", domain=DOMAIN
        )
    )
    graph.input.append(
        helper.make_tensor_value_info(lora.table, TensorProto.INT64, [f"{TABLE_DIM}_{index}", 4])
    )
    graph.initializer.append(numpy_helper.from_array(np.zeros([1, 4], np.int64), lora.table))
    return lora


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


def strip_branches(optimized: onnx.ModelProto, inputs: list[LoraInput]) -> onnx.ModelProto:
    """The optimized LoRA graph without its branches: what base-only runs execute.

    Works on the optimized graph, so both graphs refer to the same (prepacked) weights in the same
    data file and their sessions share its pages. Each branch is the MatMul fed by ``a``, the
    MatMul fed by ``b``, the bias delta's Add where there is one, and the Add joining the base
    output; the Add's consumers read the base output again (an Identity keeps a graph output's
    name).
    """
    stripped = onnx.ModelProto()
    stripped.CopyFrom(optimized)
    graph = stripped.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output}
    removed: set[int] = set()
    renamed: dict[str, str] = {}
    for lora in inputs:
        if lora.table:  # the kernel's node: its output is the base output plus the branch
            (join,) = consumers[lora.table]
            base_output = join.input[1]
            if join.output[0] in outputs:
                join.op_type, join.domain = "Identity", ""
                del join.input[:]
                join.input.append(base_output)
            else:
                removed.add(id(join))
                renamed[join.output[0]] = base_output
            continue
        (down,) = consumers[lora.a]
        (up,) = consumers[lora.b]
        removed.update((id(down), id(up)))
        tail = up
        while True:  # the bias delta's Add and the Reshape back to 2-D rows, when the branch has them
            (join,) = consumers[tail.output[0]]
            if join.op_type != "Reshape" and not (lora.bias and lora.bias in join.input):
                break
            removed.add(id(join))
            tail = join
        if join.op_type != "Add" or up.input[0] != down.output[0]:
            raise ValueError(f"LoRA branch of '{lora.site.weight}' was changed by the optimizer")
        base_output = next(name for name in join.input if name != tail.output[0])
        if join.output[0] in outputs:
            join.op_type = "Identity"
            del join.input[:]
            join.input.append(base_output)
        else:
            removed.add(id(join))
            renamed[join.output[0]] = base_output
    kept = [node for node in graph.node if id(node) not in removed]
    for node in kept:
        for index, name in enumerate(node.input):
            while name in renamed:
                name = renamed[name]
            node.input[index] = name
    branch_inputs = {name for lora in inputs for name in lora.names}
    del graph.node[:]
    graph.node.extend(_live(kept, outputs))
    _keep_only(graph.initializer, lambda tensor: tensor.name not in branch_inputs)
    _keep_only(graph.input, lambda value: value.name not in branch_inputs)
    if not any(node.domain == DOMAIN for node in graph.node):
        _keep_only(stripped.opset_import, lambda opset: opset.domain != DOMAIN)
    return stripped


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose results nothing reads (a branch's input Reshape)."""
    while True:
        read = {name for node in nodes for name in node.input} | outputs
        live = [node for node in nodes if any(name in read for name in node.output)]
        if len(live) == len(nodes):
            return live
        nodes = live


def _keep_only(repeated, keep) -> None:
    kept = [item for item in repeated if keep(item)]
    del repeated[:]
    repeated.extend(kept)
