"""Make the bench decoder for bench/generation.py: a Qwen2-style checkpoint (12 layers, d 768, 12
heads, 4 KV heads, intermediate 3072, vocab 32k, random weights), exported by Optimum with past,
and 32 rank-16 PEFT adapters (16 on q_proj/v_proj, 16 on every linear layer). Written under
bench/out/decoder (not in the repository), with the checkpoint itself (``checkpoint/``), which
bench/generation_peers.py gives to onnxruntime-genai's model builder and to PyTorch + PEFT. Needs
transformers, PEFT and Optimum, as the fixture scripts do (not part of ``make bench``):

    /tmp/fx/bin/python bench/make_decoder.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from optimum.exporters.onnx import main_export
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

OUT = Path(__file__).resolve().parent / "out" / "decoder"
ADAPTERS = 16


def config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=32000,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=3072,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(), attn_implementation="eager").eval()
    model.save_pretrained(OUT / "checkpoint")
    export = {"task": "text-generation-with-past", "no_post_process": True}
    main_export(str(OUT / "checkpoint"), output=str(OUT / "onnx"), **export)
    targets = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}
    made = []
    for kind, modules in targets.items():
        for index in range(ADAPTERS):
            peft_model = get_peft_model(
                model, LoraConfig(r=16, lora_alpha=32, target_modules=modules, init_lora_weights=False)
            )
            torch.manual_seed(1000 + index)
            with torch.no_grad():
                for name, parameter in peft_model.named_parameters():
                    if "lora_" in name:
                        parameter.normal_(0, 0.01)
            name = f"{kind}-{index}"
            peft_model.save_pretrained(str(OUT / "adapters" / name))
            model = peft_model.unload()  # the base without the LoRA layers, for the next adapter
            made.append(name)
    (OUT / "adapters.json").write_text(json.dumps(made) + "\n")
    print(f"wrote {OUT}: model and {len(made)} adapters")


if __name__ == "__main__":
    main()
