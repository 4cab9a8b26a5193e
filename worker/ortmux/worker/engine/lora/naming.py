"""The source-framework module a projection belongs to, from the signals exporters leave.

In this order:

1. the weight's name, ``<module>.weight`` (the demo model, GPT-2's Conv1D weights), also as the
   quantizers and ``quant_pre_process`` rename it (``<module>.weight_t_quantized``, ``_Q4``);
2. the TorchScript exporter's node scope, ``/encoder/layer.0/attention/self/query/MatMul`` ->
   ``encoder.layer.0.attention.self.query`` (Optimum, ``torch.onnx.export(dynamo=False)``; the
   quantizers keep it, ``.../query/MatMul_quant``);
3. the dynamo exporter's ``pkg.torch.onnx.name_scopes`` node metadata;
4. the bias that a following Add or Gemm adds, ``<module>.bias``, used only when nothing else names it.
"""

from __future__ import annotations

import ast

import onnx

from ortmux.worker.engine.quantized_ops import stem

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def from_weight(name: str) -> str:
    """``<module>.weight`` (or a quantizer's rename of it, ``<module>.weight_...``) -> ``<module>``."""
    head, dot, tail = stem(name).rpartition(".weight")
    return head if dot and (not tail or tail.startswith("_")) else ""


def from_node_name(name: str) -> str:
    """``/model/layers.0/self_attn/q_proj/MatMul`` -> ``model.layers.0.self_attn.q_proj``."""
    if not name.startswith("/"):
        return ""
    parts = [part for part in name.split("/") if part]
    return ".".join(parts[:-1]) if len(parts) > 1 else ""


def from_scopes(node: onnx.NodeProto) -> str:
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
                modules = list(paths[:-1]) if len(paths) > 1 else paths
                return modules[-1] if modules else ""
    return ""


def module_names(node: onnx.NodeProto, weight: str, bias_module: str) -> tuple[str, str, tuple[str, ...]]:
    """(the rule that named it, the module, further names other signals gave)."""
    signals = [
        ("initializer", from_weight(weight)),
        ("node scope", from_node_name(node.name)),
        ("name scopes", from_scopes(node)),
    ]
    named = [(rule, name) for rule, name in signals if name] or (
        [("bias", bias_module)] if bias_module else []
    )
    rule, module = named[0] if named else ("", "")
    aliases = tuple(dict.fromkeys(name for _rule, name in named[1:] if name != module))
    return rule, module, aliases
