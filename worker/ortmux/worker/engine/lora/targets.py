"""Which base weights adapters can change, and which source-framework module each one is.

A LoRA site is a MatMul (or Gemm) whose weight operand is a 2-D initializer, directly, through a
Transpose (how exporters store torch's [out, in] Linear weights), a Cast, a DequantizeLinear (QDQ
quantization) or Gemm's ``transB``; or a quantized projection (MatMulInteger, DynamicQuantizeMatMul,
MatMulNBits: see :mod:`ortmux.worker.engine.quantized_ops`), whose branch reads the float activation
going in and adds to the float result coming out, so adapters stay float over a quantized base.
Its module name comes from the signals :mod:`ortmux.worker.engine.lora.naming` reads; an explicit
``module_mapping`` wins over them (:mod:`ortmux.worker.engine.lora.mapping`).

A PEFT module matches a site's name exactly, or on whole trailing path components where the
two disagree on a wrapper prefix (``transformer.``, ``model.``, a task head's ``bert.``). Shapes
alone never decide a mapping, and two candidates for one module are refused.

Each site also records where its branch reads: the activation ``[batch, ..., in]`` itself, a
``[batch, in]`` matrix, or the ``[batch, ..., in]`` tensor that a Reshape flattened into
``[batch*seq, in]`` (GPT-2, Gemm-based exports). A flattened activation is used only when the
graph proves the flatten keeps rows batch-major; projections that cannot take a branch are listed
with the reason, so ``ortmux inspect`` shows users what they can target.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence

import onnx
from onnx import numpy_helper

from ortmux.worker.engine.lora.naming import module_names
from ortmux.worker.engine.lora.shapes import batch_symbol, infer_shapes
from ortmux.worker.engine.lora.sites import (
    FLATTENED,
    FUSED_OPS,
    MATRIX,
    ROWS,
    LoraSite,
    SiteReport,
    Unadaptable,
    WeightRead,
)
from ortmux.worker.engine.lora.uses import assign_groups, hidden_uses, scope_of
from ortmux.worker.engine.quantized_ops import (
    WEIGHT_INPUT,
    QuantizedProjection,
    quantized_projection,
)

log = logging.getLogger(__name__)


class _Graph:
    def __init__(self, model: onnx.ModelProto, shapes: Mapping[str, list[str | int]] | None) -> None:
        graph = model.graph
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.producers = {output: node for node in graph.node for output in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self._shapes = shapes
        self.batch = batch_symbol(model)
        self._model = model
        self._concrete: dict[int, dict[str, list[str | int]]] | None = None

    @property
    def shapes(self) -> Mapping[str, list[str | int]]:
        """Inferred on first use: naming projections needs no shapes, placing branches does."""
        if self._shapes is None:
            self._shapes = infer_shapes(self._model)
        return self._shapes

    def weight_behind(self, name: str) -> WeightRead | None:
        """The 2-D weight ``name`` reads, through the no-op and layout nodes exporters put in front
        of weights: Identity, Cast, Transpose, DequantizeLinear, and a Reshape of an initializer by a
        constant shape. None when ``name`` is no such weight (an activation, or a weight reached
        through anything else: :mod:`~ortmux.worker.engine.lora.uses` finds those)."""
        transposed, dequantized, shape = False, 0, None
        for _ in range(6):
            if name in self.initializers:
                dims = shape or tuple(int(d) for d in self.initializers[name].dims)
                return WeightRead(name, transposed, dequantized, dims) if len(dims) == 2 else None
            producer = self.producers.get(name)
            if producer is None:
                return None
            if producer.op_type == "Transpose":
                perm = [list(attr.ints) for attr in producer.attribute if attr.name == "perm"]
                if perm not in ([], [[1, 0]]) or shape is not None:  # not a reshaped transpose
                    return None
                transposed = not transposed
            elif producer.op_type == "DequantizeLinear":
                scale = self.initializers.get(producer.input[1]) if len(producer.input) > 1 else None
                dequantized = scale.data_type if scale is not None else onnx.TensorProto.FLOAT
            elif producer.op_type == "Reshape":
                if shape is not None or dequantized:
                    return None
                shape = self._reshaped(producer)
                if shape is None:
                    return None
            elif producer.op_type not in ("Cast", "Identity"):
                return None
            name = producer.input[0]
        return None

    def _reshaped(self, node: onnx.NodeProto) -> tuple[int, ...] | None:
        """The shape a Reshape of an initializer by a constant shape gives it, if it is one."""
        data = self.initializers.get(node.input[0])
        target = self.initializers.get(node.input[1]) if len(node.input) > 1 else None
        if data is None or target is None:
            return None
        dims = [int(d) for d in data.dims]
        wanted = [int(v) for v in numpy_helper.to_array(target).reshape(-1)]
        wanted = [dims[i] if v == 0 and i < len(dims) else v for i, v in enumerate(wanted)]
        total, known = math.prod(dims), math.prod(d for d in wanted if d != -1)
        if wanted.count(-1) > 1 or known <= 0 or total % known:
            return None
        wanted = [total // known if dim == -1 else dim for dim in wanted]
        return tuple(wanted) if math.prod(wanted) == total else None

    def bias_of(self, node: onnx.NodeProto, out_features: int) -> str:
        """The 1-D ``[out]`` initializer added to the projection's result (through Identity):
        Gemm's C (with beta 1), or one Add right after it. Empty if there is none."""
        if node.op_type == "Gemm":
            if len(node.input) < 3 or not node.input[2]:
                return ""
            beta = next((attr.f for attr in node.attribute if attr.name == "beta"), 1.0)
            return self._bias(node.input[2], out_features) if beta == 1.0 else ""
        adds = [c for c in self.consumers.get(node.output[0], []) if c.op_type == "Add"]
        if len(adds) != 1:
            return ""
        other = [name for name in adds[0].input if name != node.output[0]]
        return self._bias(other[0], out_features) if len(other) == 1 else ""

    def _bias(self, name: str, out_features: int) -> str:
        for _ in range(4):
            producer = self.producers.get(name)
            if producer is None or producer.op_type != "Identity":
                break
            name = producer.input[0]
        tensor = self.initializers.get(name)
        return name if tensor is not None and [int(d) for d in tensor.dims] == [out_features] else ""

    def bias_module(self, node: onnx.NodeProto) -> str:
        """``<module>`` of a ``<module>.bias`` added to the node's output (by Gemm or an Add)."""
        names = [node.input[2]] if node.op_type == "Gemm" and len(node.input) > 2 else []
        for consumer in self.consumers.get(node.output[0], []):
            if consumer.op_type == "Add":
                names += [name for name in consumer.input if name != node.output[0]]
        for name in names:
            if name in self.initializers and name.endswith(".bias"):
                return name[: -len(".bias")]
        return ""

    def layout(self, x: str, in_features: int) -> tuple[str, str, int, bool] | str:
        """(layout, branch source, its rank, whether rows of the batch can take different
        adapters) for an activation, or why no branch can read it."""
        dims = self.shapes.get(x, [])
        if not self.batch:
            return "the model's inputs share no dynamic batch dimension"
        if len(dims) >= 2 and self._shared(x, dims):
            # The same tensor for every row: one adapter's branch applies to the whole run.
            return (ROWS if len(dims) >= 3 else MATRIX), x, len(dims), False
        if len(dims) >= 3:
            if dims[0] == self.batch:
                return ROWS, x, len(dims), True
            return f"its activation {_show(dims)} does not lead with the batch dimension '{self.batch}'"
        if len(dims) != 2:
            return f"the activation's shape is unknown ({_show(dims)})"
        if dims[0] == self.batch:
            return MATRIX, x, 2, True
        producer = self.producers.get(x)
        if producer is None or producer.op_type != "Reshape":
            return (
                f"its activation {_show(dims)} is 2-D and not traceable to a [{self.batch}, ..., "
                f"{in_features}] tensor"
            )
        source = producer.input[0]
        if self._batch_major(source, x, in_features):
            return FLATTENED, source, len(self.shapes.get(source, [])) or 3, True
        return (
            f"its activation {_show(dims)} is a Reshape of {_show(self.shapes.get(source, []))} that "
            f"cannot be shown to keep each row of [{self.batch}, ...] together: rows of different "
            "requests could mix"
        )

    def _shared(self, x: str, dims: Sequence[str | int]) -> bool:
        """Whether ``x`` has one static shape whatever the batch (no row of its own per request):
        every dimension a number, and the same at two concrete batch sizes where those infer."""
        if not all(isinstance(dim, int) and dim > 0 for dim in dims):
            return False
        return all(shapes.get(x, list(dims)) == list(dims) for shapes in self.concrete().values())

    def _batch_major(self, source: str, flat: str, in_features: int) -> bool:
        """Whether Reshape(source) -> flat [rows, in] keeps rows batch-major: source leads with the
        batch, and each batch element holds a whole number of rows. Proven on the symbolic shapes,
        else on shapes inferred for two concrete batch sizes (the rows must scale with it)."""
        dims, source_dims = self.shapes.get(flat, []), self.shapes.get(source, [])
        if len(source_dims) >= 2 and source_dims[0] == self.batch and dims[-1:] == [in_features]:
            trailing = 1
            for dim in reversed(source_dims[1:]):
                if not isinstance(dim, int) or trailing >= in_features:
                    break
                trailing *= dim
            if trailing == in_features:
                return True
        per_batch = []
        for batch, shapes in self.concrete().items():
            flat_dims, source_dims = shapes.get(flat, []), shapes.get(source, [])
            if (
                len(flat_dims) != 2
                or flat_dims[1] != in_features
                or not source_dims
                or source_dims[0] != batch
                or not all(isinstance(d, int) for d in [*flat_dims, *source_dims])
                or flat_dims[0] % batch
            ):
                return False
            per_batch.append(flat_dims[0] // batch)
        return len(per_batch) == 2 and per_batch[0] == per_batch[1] > 0

    def concrete(self) -> dict[int, dict[str, list[str | int]]]:
        """Shapes inferred with the batch set to 3 and to 5 (every other free dimension 16)."""
        if self._concrete is None:
            self._concrete = {}
            for batch in (3, 5):
                model = onnx.ModelProto()
                model.CopyFrom(self._model)
                for value in model.graph.input:
                    for dim in value.type.tensor_type.shape.dim:
                        if dim.dim_param:
                            dim.dim_value = batch if dim.dim_param == self.batch else 16
                try:
                    self._concrete[batch] = infer_shapes(model)
                except Exception:  # the model does not infer at these sizes
                    self._concrete = {}
                    break
        return self._concrete


def _show(dims: Sequence[str | int]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]" if dims else "[?]"


def find_sites(model: onnx.ModelProto, shapes: Mapping[str, list[str | int]] | None = None) -> SiteReport:
    """Every LoRA site of the main graph in graph order, with the projections that cannot take one."""
    graph = _Graph(model, shapes)
    index_of = {id(node): index for index, node in enumerate(model.graph.node)}
    sites: list[LoraSite] = []
    unadaptable: list[Unadaptable] = []
    fused = [
        f"{node.op_type} '{node.name or f'#{index}'}'"
        for index, node in enumerate(model.graph.node)
        if node.op_type in FUSED_OPS
        and any(name in graph.initializers and len(graph.initializers[name].dims) == 2 for name in node.input)
    ]
    projections_at = set()
    for label, node, projection in _projections(model, graph, unadaptable):
        output_node = projection.output_node
        projections_at.add(index_of[id(node)])
        rule, module, aliases = module_names(node, projection.weight, graph.bias_module(output_node))
        placed = graph.layout(projection.activation, projection.in_features)
        if isinstance(placed, str):
            unadaptable.append(
                Unadaptable(label, node.op_type, projection.weight, module, placed, scope=scope_of(node))
            )
            continue
        layout, source, source_rank, per_row = placed
        sites.append(
            LoraSite(
                weight=projection.weight,
                module=module,
                node=node.name,
                activation=source,
                output=output_node.output[0],
                in_features=projection.in_features,
                out_features=projection.out_features,
                node_index=index_of[id(output_node)],
                rule=rule,
                aliases=aliases,
                layout=layout,
                source_rank=source_rank,
                dtype=projection.dtype,
                quantized="" if projection.op_type in ("MatMul", "Gemm") else projection.op_type,
                per_row=per_row,
                bias=graph.bias_of(output_node, projection.out_features)
                if projection.op_type in ("MatMul", "Gemm")
                else "",
                weight_shape=projection.weight_shape,
                transposed=projection.transposed,
                scope=scope_of(node),
            )
        )
    weights = {site.weight for site in sites}
    unadaptable += hidden_uses(model, graph.initializers, graph.producers, weights, projections_at)
    return assign_groups(SiteReport(sites, unadaptable, fused))


def projection_names(model: onnx.ModelProto) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """Each projection's result tensor -> (rule, module, aliases), without shape inference."""
    graph = _Graph(model, None)
    return {
        projection.output_node.output[0]: module_names(
            node, projection.weight, graph.bias_module(projection.output_node)
        )
        for _label, node, projection in _projections(model, graph, [])
    }


def carry_names(report: SiteReport, names: Mapping[str, tuple[str, str, tuple[str, ...]]]) -> SiteReport:
    """``report``'s sites named as :func:`projection_names` of the same graph before quantization
    named the projection that produced the same result tensor: the quantizers keep those tensor
    names, not the exporters' metadata."""
    sites = []
    for site in report.sites:
        rule, module, aliases = names.get(site.output, ("", "", ()))
        if module:
            site = dataclasses.replace(site, module=module, rule=rule, aliases=aliases)
        sites.append(site)
    return SiteReport(sites, report.unadaptable, report.fused)


def _projections(
    model: onnx.ModelProto, graph: _Graph, unadaptable: list[Unadaptable]
) -> Iterator[tuple[str, onnx.NodeProto, QuantizedProjection]]:
    """(label, node, projection) for every projection on a weight, float or quantized, in graph
    order; those that can never take a branch go to ``unadaptable``."""
    for index, node in enumerate(model.graph.node):
        label = node.name or f"#{index}"
        projection = quantized_projection(node, graph.initializers, graph.producers, graph.consumers)
        if isinstance(projection, str):
            weight = node.input[WEIGHT_INPUT[node.op_type]]
            _rule, module, _aliases = module_names(node, weight, graph.bias_module(node))
            unadaptable.append(
                Unadaptable(label, node.op_type, weight, module, projection, scope=scope_of(node))
            )
            continue
        if projection is None:
            projection = _float_projection(graph, node, label, unadaptable)
        if projection is not None:
            yield label, node, projection


def _float_projection(
    graph: _Graph, node: onnx.NodeProto, label: str, unadaptable: list[Unadaptable]
) -> QuantizedProjection | None:
    """A MatMul or Gemm on a (possibly dequantized) weight, in the shape of a quantized one
    (``op_type`` DequantizeLinear when its weight is quantized); None when ``node`` is none."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    found = graph.weight_behind(node.input[1])
    if found is None:
        return None  # activation x activation (attention scores), not a projection
    operand, transposed, dequantized = found.name, found.transposed, found.dequantized
    if node.op_type == "Gemm":
        attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            _rule, module, _aliases = module_names(node, operand, graph.bias_module(node))
            unadaptable.append(
                Unadaptable(label, node.op_type, operand, module, "Gemm with transA or alpha != 1")
            )
            return None
        transposed = transposed != bool(attrs.get("transB", 0))
    rows, cols = found.shape
    in_features, out_features = (cols, rows) if transposed else (rows, cols)
    op_type = "DequantizeLinear" if dequantized else node.op_type
    activation = node.input[0]
    dequantize = graph.producers.get(activation)
    if dequantize is not None and dequantize.op_type == "DequantizeLinear":
        # QDQ: the branch reads the float tensor before QuantizeLinear -> DequantizeLinear.
        quantize = graph.producers.get(dequantize.input[0])
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            activation = quantize.input[0]
    return QuantizedProjection(
        op_type, operand, activation, node, in_features, out_features, dequantized, found.shape, transposed
    )
