"""What site discovery reports: adaptable projections (LoRA sites), those no branch can take,
and how a projection reads its weight."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

# How a branch reads its activation: [batch, ..., in] itself; a [batch, in] matrix; or the
# [batch, ..., in] tensor a Reshape flattened into [batch*seq, in].
ROWS, MATRIX, FLATTENED = "rows", "matrix", "flattened"
# Fused ONNX Runtime / Optimum operators that consume projection weights no branch can reach.
FUSED_OPS = frozenset(
    {"Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention", "QAttention", "FusedMatMul"}
)


@dataclasses.dataclass(frozen=True)
class LoraSite:
    """One adaptable projection: ``y = x @ W`` with W [in_features, out_features] as applied.

    ``activation`` is the tensor the branch reads (``source_rank`` dims, batch first, features
    last) and ``output`` the tensor its delta is added to; ``layout`` says how they relate.
    """

    weight: str
    module: str
    node: str
    activation: str
    output: str
    in_features: int
    out_features: int
    node_index: int = -1  # position in the source graph's node list (names may be empty)
    rule: str = ""  # which signal named the module
    aliases: tuple[str, ...] = ()  # further module names other signals gave
    layout: str = ROWS
    source_rank: int = 3
    dtype: int = 0  # onnx type of the branch's factors; 0: the weight's own
    quantized: str = ""  # the quantized operator computing the projection, if one does
    # The key an adapter's factors for this site are held under: every call of one module shares
    # it (the uses of its weight under its scope, or all uses where the graph has no scopes).
    group: str = ""
    # False where the activation has no batch dimension (e.g. relative position embeddings
    # [1, 2*span, hidden] shared by every row): one adapter's factors apply to the whole run.
    per_row: bool = True
    bias: str = ""  # the [out] initializer added to the result, if there is one
    weight_shape: tuple[int, ...] = ()  # the 2-D shape the projection reads the weight as
    transposed: bool = False  # whether that shape is [out, in]
    scope: str = ""  # the module path the exporter put the node under, if it left one

    @property
    def call_group(self) -> str:
        return self.group or self.weight

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name in (self.module, *self.aliases) if name)

    @classmethod
    def from_json(cls, values: Mapping) -> LoraSite:
        fields = {field.name for field in dataclasses.fields(cls)}
        kept = {key: value for key, value in values.items() if key in fields}
        kept["aliases"] = tuple(kept.get("aliases", ()))
        kept["weight_shape"] = tuple(kept.get("weight_shape", ()))
        return cls(**kept)


@dataclasses.dataclass(frozen=True)
class Unadaptable:
    """A MatMul/Gemm on a weight that no branch can take, and why."""

    node: str
    op_type: str
    weight: str
    module: str
    reason: str
    scope: str = ""
    group: str = ""  # the call group of the weight's uses this use belongs to


@dataclasses.dataclass(frozen=True)
class WeightRead:
    """How a projection reads its weight initializer."""

    name: str
    transposed: bool
    dequantized: int  # the float type a DequantizeLinear gives it; 0 if none
    shape: tuple[int, ...]  # 2-D, as read (a Reshape may have changed the initializer's)


@dataclasses.dataclass(frozen=True)
class SiteReport:
    sites: list[LoraSite]
    unadaptable: list[Unadaptable]
    fused: list[str]  # fused nodes holding projection weights ("Attention 'Attention_0'")
