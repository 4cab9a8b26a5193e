"""The built-in demo model: a small transformer-like ONNX model, generated deterministically.

Token ids in, logits out: embedding, two pre-norm blocks (4-head self-attention and a GELU MLP),
a final layer norm and an LM head. Projection weights are stored as torch stores Linear weights
([out, in], named ``<module>.weight``) behind a Transpose, as exported models have them, so
adapters can name the modules they target. About 2.6 MB of float32 weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ortmux.worker.files import write_atomically

DEMO_NAME = "demo"
DEMO_VERSION = 1
OPSET = 20
IR_VERSION = 9  # what ONNX Runtime 1.2x+ loads; newer onnx releases default higher


@dataclasses.dataclass(frozen=True)
class TransformerShape:
    """Sizes of a generated transformer-like model; the seed fixes its weights."""

    vocab: int
    d_model: int
    heads: int
    d_ff: int
    layers: int
    seed: int = 20261124

    @property
    def parameters(self) -> int:
        per_layer = (
            4 * self.d_model * self.d_model + 2 * self.d_model * self.d_ff + self.d_ff + 5 * self.d_model
        )
        return 2 * self.vocab * self.d_model + self.layers * per_layer + 2 * self.d_model


DEMO_SHAPE = TransformerShape(vocab=1000, d_model=128, heads=4, d_ff=512, layers=2)


class _GraphBuilder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        std = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        values = (self.rng.standard_normal(shape) * std).astype(np.float32)
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def constant(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def linear(self, x: str, module: str, d_in: int, d_out: int, bias: bool = False) -> str:
        weight = self.weight(f"{module}.weight", (d_out, d_in))
        weight_t = self.node("Transpose", [weight], f"{module}.weight_t", perm=[1, 0])
        y = self.node("MatMul", [x, weight_t], f"{module}.matmul")
        if bias:
            b = self.constant(f"{module}.bias", np.zeros(d_out, dtype=np.float32))
            y = self.node("Add", [y, b], f"{module}.add_bias")
        return y

    def layer_norm(self, x: str, module: str, width: int) -> str:
        scale = self.constant(f"{module}.weight", np.ones(width, dtype=np.float32))
        bias = self.constant(f"{module}.bias", np.zeros(width, dtype=np.float32))
        return self.node("LayerNormalization", [x, scale, bias], f"{module}.out", axis=-1, epsilon=1e-5)


def build_demo_model() -> onnx.ModelProto:
    """The demo model, identical bytes on every call."""
    return build_transformer(DEMO_SHAPE)


def build_transformer(shape: TransformerShape) -> onnx.ModelProto:
    """A transformer-like model of the given sizes, identical bytes for the same sizes and seed."""
    g = _GraphBuilder(np.random.default_rng(shape.seed))
    d_model, heads, d_ff, vocab = shape.d_model, shape.heads, shape.d_ff, shape.vocab
    head_dim = d_model // heads
    heads_shape = g.constant("shape.heads", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merged_shape = g.constant("shape.merged", np.array([0, 0, d_model], dtype=np.int64))
    attn_scale = g.constant("attn.scale", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32))

    embed = g.weight("embed_tokens.weight", (vocab, d_model), scale=0.02)
    x = g.node("Gather", [embed, "input_ids"], "embed_tokens.out", axis=0)
    for i in range(shape.layers):
        prefix = f"layers.{i}"
        h = g.layer_norm(x, f"{prefix}.input_layernorm", d_model)
        q = g.linear(h, f"{prefix}.self_attn.q_proj", d_model, d_model)
        k = g.linear(h, f"{prefix}.self_attn.k_proj", d_model, d_model)
        v = g.linear(h, f"{prefix}.self_attn.v_proj", d_model, d_model)
        q = g.node("Reshape", [q, heads_shape], f"{prefix}.self_attn.q_heads")
        k = g.node("Reshape", [k, heads_shape], f"{prefix}.self_attn.k_heads")
        v = g.node("Reshape", [v, heads_shape], f"{prefix}.self_attn.v_heads")
        q = g.node("Transpose", [q], f"{prefix}.self_attn.q_bhsd", perm=[0, 2, 1, 3])
        k = g.node("Transpose", [k], f"{prefix}.self_attn.k_bhds", perm=[0, 2, 3, 1])
        v = g.node("Transpose", [v], f"{prefix}.self_attn.v_bhsd", perm=[0, 2, 1, 3])
        scores = g.node("MatMul", [q, k], f"{prefix}.self_attn.scores")
        scores = g.node("Mul", [scores, attn_scale], f"{prefix}.self_attn.scaled")
        probs = g.node("Softmax", [scores], f"{prefix}.self_attn.probs", axis=-1)
        ctx = g.node("MatMul", [probs, v], f"{prefix}.self_attn.context")
        ctx = g.node("Transpose", [ctx], f"{prefix}.self_attn.context_bshd", perm=[0, 2, 1, 3])
        ctx = g.node("Reshape", [ctx, merged_shape], f"{prefix}.self_attn.context_merged")
        attn = g.linear(ctx, f"{prefix}.self_attn.o_proj", d_model, d_model)
        x = g.node("Add", [x, attn], f"{prefix}.attn_residual")
        h = g.layer_norm(x, f"{prefix}.post_attention_layernorm", d_model)
        up = g.linear(h, f"{prefix}.mlp.up_proj", d_model, d_ff, bias=True)
        act = g.node("Gelu", [up], f"{prefix}.mlp.gelu")
        down = g.linear(act, f"{prefix}.mlp.down_proj", d_ff, d_model, bias=True)
        x = g.node("Add", [x, down], f"{prefix}.mlp_residual")
    x = g.layer_norm(x, "norm", d_model)
    logits = g.linear(x, "lm_head", d_model, vocab)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))

    graph = helper.make_graph(
        g.nodes,
        "ortmux_demo",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="ortmux-demo",
        producer_version=str(DEMO_VERSION),
    )
    onnx.checker.check_model(model)
    return model


# The demo's declared context length (it has no position embeddings to set one): written beside
# it as config.json, where the worker reads a model's limits, so that one request cannot ask its
# attention for gigabytes ([1, 16384] tokens: 4 GiB of scores per layer).
DEMO_CONFIG = {"model_type": "ortmux-demo", "vocab_size": DEMO_SHAPE.vocab, "max_seq_len": 2048}


def ensure_demo_model(data_dir: Path) -> Path:
    """The demo model's path under ``data_dir``, generated there on first use, with its
    config.json."""
    path = data_dir / "models" / f"{DEMO_NAME}-v{DEMO_VERSION}.onnx"
    if not path.is_file():
        write_atomically(path, build_demo_model().SerializeToString())
    config = path.parent / "config.json"
    if not config.is_file():
        write_atomically(config, (json.dumps(DEMO_CONFIG, indent=1) + "\n").encode())
    return path
