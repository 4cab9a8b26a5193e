"""Which base weights adapters can change, and which source-framework module each one is.

A LoRA site is a MatMul (or Gemm) whose weight operand is a 2-D initializer, directly, through a
Transpose (how exporters store torch's [out, in] Linear weights) or through Gemm's ``transB``.
Its module name comes, in order, from an explicit mapping, from the initializer name
(``<module>.weight``), or from the torch exporter's ``pkg.torch.onnx.name_scopes`` metadata on
the node. Shapes alone never decide a mapping.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping, Sequence

import onnx

from ortmux.worker.errors import InvalidArgument

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclasses.dataclass(frozen=True)
class LoraSite:
    """One adaptable projection: ``y = x @ W`` with W [in_features, out_features] as applied."""

    weight: str
    module: str
    node: str
    activation: str
    output: str
    in_features: int
    out_features: int


def _module_from_scopes(node: onnx.NodeProto) -> str:
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            if isinstance(scopes, list):
                # ['', 'encoder', ..., 'encoder.layer.0.attention.self.query', 'linear']: the
                # deepest dotted module path names the torch module the MatMul belongs to.
                paths = [scope for scope in scopes if isinstance(scope, str) and scope]
                modules = [scope for scope in paths[:-1]] if len(paths) > 1 else paths
                return modules[-1] if modules else ""
    return ""


def find_sites(model: onnx.ModelProto) -> list[LoraSite]:
    """Every LoRA site of the main graph, in graph order."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    sites = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0):
            continue
        operand = node.input[1]
        transposed = node.op_type == "Gemm" and bool(attrs.get("transB", 0))
        scope_node = node
        producer = producers.get(operand)
        if operand not in initializers and producer is not None and producer.op_type == "Transpose":
            perm = [list(attr.ints) for attr in producer.attribute if attr.name == "perm"]
            if perm in ([], [[1, 0]]) and producer.input[0] in initializers:
                operand = producer.input[0]
                transposed = not transposed
        tensor = initializers.get(operand)
        if tensor is None or len(tensor.dims) != 2:
            continue
        rows, cols = tensor.dims
        in_features, out_features = (cols, rows) if transposed else (rows, cols)
        module = (
            operand[: -len(".weight")] if operand.endswith(".weight") else _module_from_scopes(scope_node)
        )
        sites.append(
            LoraSite(
                weight=operand,
                module=module,
                node=node.name,
                activation=node.input[0],
                output=node.output[0],
                in_features=int(in_features),
                out_features=int(out_features),
            )
        )
    return sites


def map_modules(
    sites: Sequence[LoraSite], modules: Sequence[str], explicit: Mapping[str, str] | None = None
) -> dict[str, LoraSite]:
    """Module name -> site for every module an adapter targets; every miss is listed at once.

    ``explicit`` maps module names to initializer names and wins over the names in the graph.
    """
    by_weight = {site.weight: site for site in sites}
    by_module: dict[str, list[LoraSite]] = {}
    for site in sites:
        if site.module:
            by_module.setdefault(site.module, []).append(site)
    mapped: dict[str, LoraSite] = {}
    problems = []
    for module in modules:
        if explicit and module in explicit:
            site = by_weight.get(explicit[module])
            if site is None:
                problems.append(f"{module} -> {explicit[module]} (mapping names no adaptable weight)")
            else:
                mapped[module] = site
            continue
        candidates = by_module.get(module, [])
        if len(candidates) == 1:
            mapped[module] = candidates[0]
        elif not candidates:
            problems.append(f"{module} (no weight of the base model belongs to it)")
        else:
            problems.append(f"{module} (ambiguous: {', '.join(site.weight for site in candidates)})")
    if problems:
        raise InvalidArgument(
            "cannot map these adapter modules to base weights: " + "; ".join(problems), field="target_modules"
        )
    return mapped
