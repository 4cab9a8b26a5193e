"""Every use of a projection weight: which projections are calls of one module, and which uses no
branch can take.

PEFT replaces a Linear by a LoRA layer, so an adapter's delta applies at every call of the module:
DeBERTa applies ``query_proj`` to the hidden states and again to the relative position embeddings
(``.../query_proj_1/MatMul``), ALBERT applies one layer's weights at every depth (``query_1``,
``query_2``). The uses of a weight whose node scopes name one module, or a repeated call of it, form
one *call group*: an adapter's factors go to every site of the group, held under the group's key.
Where a graph carries no scopes, every use of the weight is one group. A use under another module's
scope (a tied weight) is a group of its own, adapted only when that module is targeted.

A weight can also reach a MatMul through something that is not a no-op (Slice, Concat, Mul, a
Gather of rows) or sit inside a fused operator: no branch can take that use, so an adapter that
targets its group is refused rather than applied partially.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable, Mapping

import onnx

from ortmux.worker.engine.lora.naming import from_node_name, from_scopes, module_names
from ortmux.worker.engine.lora.sites import FUSED_OPS, SiteReport, Unadaptable
from ortmux.worker.engine.quantized_ops import PROJECTIONS

_CALL_SUFFIX = re.compile(r"_\d+$")
# Operators a weight's value is not read through: they make a new tensor from activations (the
# weight would be that projection's own), or read only a shape.
_STOP = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Shape", "Size"}) | PROJECTIONS
_NO_OPS = frozenset({"Identity", "Cast", "Transpose", "DequantizeLinear", "Reshape"})
_WALK_LIMIT = 32


def scope_of(node: onnx.NodeProto) -> str:
    """The module path the exporter put the node under (TorchScript node scope, dynamo name scopes)."""
    return from_node_name(node.name) or from_scopes(node)


def call_path(scope: str) -> str:
    """A scope with the exporters' repeated-call suffixes dropped: ``attention.query_1`` and
    ``attention_2.query`` -> ``attention.query``."""
    return ".".join(_CALL_SUFFIX.sub("", part) for part in scope.split("."))


def assign_groups(report: SiteReport) -> SiteReport:
    """``report`` with each site's and each weight-reading unadaptable use's call group set."""
    paths: dict[str, set[str]] = collections.defaultdict(set)
    for use in [*report.sites, *report.unadaptable]:
        if use.scope:
            paths[use.weight].add(call_path(use.scope))

    def group(weight: str, scope: str) -> str:
        if len(paths[weight]) <= 1 or not scope:
            return weight
        return f"{weight}@{call_path(scope)}"

    sites = [dataclasses.replace(site, group=group(site.weight, site.scope)) for site in report.sites]
    unadaptable = [dataclasses.replace(use, group=group(use.weight, use.scope)) for use in report.unadaptable]
    return SiteReport(sites, unadaptable, report.fused)


def hidden_uses(
    model: onnx.ModelProto,
    initializers: Mapping[str, onnx.TensorProto],
    producers: Mapping[str, onnx.NodeProto],
    site_weights: Iterable[str],
    projections_at: Iterable[int],
) -> list[Unadaptable]:
    """Uses of adaptable weights that no branch can take: a MatMul/Gemm (other than the
    projections, whose graph positions ``projections_at`` gives) or a fused operator whose
    operands are computed from the weight by more than the no-op and layout nodes."""
    weights = set(site_weights)
    skip = set(projections_at)
    found = []
    for index, node in enumerate(model.graph.node):
        if index in skip or node.op_type not in (FUSED_OPS | {"MatMul", "Gemm"}):
            continue
        for operand in node.input:
            for weight, path in _reaches(operand, weights, initializers, producers):
                label = node.name or f"#{index}"
                _rule, module, _aliases = module_names(node, weight, "")
                how = (
                    f"inside the fused operator {node.op_type}"
                    if node.op_type in FUSED_OPS
                    else f"through {' -> '.join(path)}, which is not a no-op"
                )
                reason = f"reads the weight {how}: no LoRA branch can take this use"
                found.append(Unadaptable(label, node.op_type, weight, module, reason, scope=scope_of(node)))
    return found


def _reaches(
    name: str,
    weights: set[str],
    initializers: Mapping[str, onnx.TensorProto],
    producers: Mapping[str, onnx.NodeProto],
) -> list[tuple[str, list[str]]]:
    """(weight, the operators between it and ``name``) for each adaptable weight ``name`` is
    computed from, within a few nodes."""
    found: list[tuple[str, list[str]]] = []
    stack: list[tuple[str, list[str]]] = [(name, [])]
    seen: set[str] = set()
    while stack and len(seen) < _WALK_LIMIT:
        current, path = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in weights:
            if not set(path) <= _NO_OPS:  # no-op reads are sites' own (or operands on the left)
                found.append((current, path))
            continue
        if current in initializers:
            continue
        producer = producers.get(current)
        if producer is None or producer.op_type in _STOP:
            continue
        stack.extend((source, [producer.op_type, *path]) for source in producer.input if source)
    return found
