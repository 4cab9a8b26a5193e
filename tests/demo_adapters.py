"""Adapters for the demo model, written as users' tools write them, and their exact references."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ortmux.worker.adapters import safetensors
from ortmux.worker.demo import build_demo_model

from .conftest import plain_session

MODULES = ("layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.1.mlp.up_proj")


def demo_weight(name: str) -> np.ndarray:
    tensors = {t.name: t for t in build_demo_model().graph.initializer}
    return numpy_helper.to_array(tensors[name])


def write_peft(directory: Path, rank: int = 4, alpha: float = 8.0, seed: int = 0, modules=MODULES) -> Path:
    """A PEFT LoRA directory (save_pretrained layout) for the demo model."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for module in modules:
        out_features, in_features = demo_weight(f"{module}.weight").shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = (
            rng.standard_normal((rank, in_features)).astype(np.float32) * 0.1
        )
        tensors[f"base_model.model.{module}.lora_B.weight"] = (
            rng.standard_normal((out_features, rank)).astype(np.float32) * 0.1
        )
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted({m.rsplit(".", 1)[1] for m in modules}),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.safetensors").write_bytes(safetensors.dump(tensors))
    return directory


def merged_reference(directory: Path | None, ids: np.ndarray, overrides: dict[str, np.ndarray] | None = None):
    """Logits of the demo model with the adapter merged into its weights, by plain ONNX Runtime."""
    model = build_demo_model()
    replaced = dict(overrides or {})
    if directory is not None:
        config = json.loads((directory / "adapter_config.json").read_text())
        tensors = safetensors.load((directory / "adapter_model.safetensors").read_bytes())
        scale = config["lora_alpha"] / config["r"]
        for key, a in tensors.items():
            if ".lora_A." in key:
                module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                b = tensors[key.replace("lora_A", "lora_B")]
                weight = f"{module}.weight"
                replaced[weight] = demo_weight(weight) + scale * (b @ a)
    for tensor in model.graph.initializer:
        if tensor.name in replaced:
            tensor.CopyFrom(numpy_helper.from_array(replaced[tensor.name].astype(np.float32), tensor.name))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "merged.onnx"
        onnx.save(model, str(path))
        return plain_session(path).run(None, {"input_ids": ids})[0]
