"""Make the bench decoder for bench/generation.py: a Qwen2-style checkpoint (12 layers, d 768, 12
heads, 4 KV heads, intermediate 3072, vocab 32k, random weights), exported by Optimum with past,
and 32 rank-16 PEFT adapters (16 on q_proj/v_proj, 16 on every linear layer). Written under
bench/out/decoder (not in the repository), with the checkpoint itself (``checkpoint/``), which
bench/generation_peers.py gives to onnxruntime-genai's model builder and to PyTorch + PEFT.
``--vocab 128256`` makes the same decoder with Llama-3's vocabulary size, under
bench/out/decoder-128k (bench/generation.py --sampling compares sampling on both). Needs
transformers, PEFT and Optimum, as the fixture scripts do (not part of ``make bench``):

    /tmp/fx/bin/python bench/make_decoder.py [--vocab 128256]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from optimum.exporters.onnx import main_export
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

BENCH = Path(__file__).resolve().parent / "out"
ADAPTERS = 16
VOCAB = 32000


def out_dir(vocab: int) -> Path:
    """Where the decoder of ``vocab`` tokens is written (bench/generation.py reads it there)."""
    return BENCH / "decoder" if vocab == VOCAB else BENCH / f"decoder-{vocab // 1000}k"


def config(vocab: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab,
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=VOCAB)
    vocab = parser.parse_args().vocab
    out = out_dir(vocab)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(vocab), attn_implementation="eager").eval()
    model.save_pretrained(out / "checkpoint")
    export = {"task": "text-generation-with-past", "no_post_process": True}
    main_export(str(out / "checkpoint"), output=str(out / "onnx"), **export)
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
            peft_model.save_pretrained(str(out / "adapters" / name))
            model = peft_model.unload()  # the base without the LoRA layers, for the next adapter
            made.append(name)
    (out / "adapters.json").write_text(json.dumps(made) + "\n")
    print(f"wrote {out}: model and {len(made)} adapters")


if __name__ == "__main__":
    main()
