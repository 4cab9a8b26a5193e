"""What users compare ortmux's generation with, on the bench decoder's own checkpoint
(bench/make_decoder.py): each peer in its own virtual environment, run by bench/generation.py
(``--peers``) or alone. Every run decodes 64-token prompts (the same random ids) greedily to
128 new tokens (eos never ends one early) and prints one JSON line per row of the table.

    /tmp/fx/bin/python bench/generation_peers.py peft       # torch + transformers + peft
    /tmp/genai/bin/python bench/generation_peers.py genai   # onnxruntime-genai (+ torch,
                                                            # transformers, peft, onnx-ir to build)

- ``peft``: transformers + PEFT on PyTorch (CPU, all cores): one adapter at batch 1, and one
  batch of 32 rows over 16 adapters (``generate(adapter_names=...)``, PEFT's mixed batches).
- ``genai``: onnxruntime-genai's model builder makes the checkpoint's fp32 and int4 models; with
  ``adapter_path`` it bakes a PEFT adapter into a model of its own (its A and B as constants), so
  16 distinct adapters are 16 models and 16 generators, stepped in turn (2 rows each), as its API
  allows (one adapter set per generator). The decoder's ``intra_op_num_threads`` is set to the
  cores (its default config runs on one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DECODER = Path(__file__).resolve().parent / "out" / "decoder"
PROMPT, NEW, ROWS = 64, 128, 32


def prompts(rows: int) -> np.ndarray:
    return np.random.default_rng(0).integers(3, 32000, size=(rows, PROMPT), dtype=np.int64)


def sixteen_adapters() -> list[str]:
    names = json.loads((DECODER / "adapters.json").read_text())
    return [name for name in names if name.startswith("qv-")][:8] + [
        name for name in names if name.startswith("all-")
    ][:8]


def emit(peer: str, run: str, rows: int, tokens: int, seconds: float) -> None:
    print(
        json.dumps({"peer": peer, "run": run, "rows": rows, "tokens_per_second": tokens / seconds}),
        flush=True,
    )


def peft(new: int) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    names = sixteen_adapters()
    base = AutoModelForCausalLM.from_pretrained(DECODER / "checkpoint", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, DECODER / "adapters" / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(DECODER / "adapters" / name, adapter_name=name)
    model.eval()
    ids = torch.from_numpy(prompts(ROWS))

    def generate(rows: int, adapters: list[str], tokens: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids[:rows],
                attention_mask=torch.ones_like(ids[:rows]),
                adapter_names=adapters,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] == PROMPT + tokens
        return time.perf_counter() - started

    generate(2, names[:2], 4)  # warm
    emit("PyTorch + PEFT", "one adapter", 1, new, generate(1, names[:1], new))
    mixed = [names[row % len(names)] for row in range(ROWS)]
    emit("PyTorch + PEFT", "mixed batch, 16 adapters", ROWS, ROWS * new, generate(ROWS, mixed, new))


def build(out: Path, precision: str, adapter: str | None = None) -> Path:
    """The model builder's output for the checkpoint (once), decoder threads set to the cores."""
    if not (out / "genai_config.json").is_file():
        command = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(DECODER / "checkpoint"),
        ]
        command += ["-o", str(out), "-p", precision, "-e", "cpu", "-c", str(DECODER / "genai-cache")]
        if adapter:
            command += ["--extra_options", f"adapter_path={DECODER / 'adapters' / adapter}"]
        subprocess.run(command, check=True, capture_output=True)
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = os.cpu_count() or 1
    config_path.write_text(json.dumps(config, indent=2))
    return out


def genai(new: int) -> None:
    import onnxruntime_genai as og

    ids = prompts(ROWS).astype(np.int32)

    def generate(models: list, rows: int, tokens: int) -> float:
        """One generator per model, ``rows`` rows each, stepped in turn until all are done."""
        started = time.perf_counter()
        generators = []
        for model in models:
            params = og.GeneratorParams(model)
            params.set_search_options(
                max_length=PROMPT + tokens, min_length=PROMPT + tokens, do_sample=False, batch_size=rows
            )
            generator = og.Generator(model, params)
            generator.append_tokens(ids[:rows])
            generators.append(generator)
        steps = 1
        while not all(generator.is_done() for generator in generators):
            for generator in generators:
                if not generator.is_done():
                    generator.generate_next_token()
            steps += 1
        assert steps >= tokens, steps
        return time.perf_counter() - started

    for precision in ("fp32", "int4"):
        model = og.Model(str(build(DECODER / f"genai-{precision}", precision)))
        generate([model], 2, 4)  # warm
        for rows in (1, ROWS):
            emit(
                f"onnxruntime-genai {precision}", "base model", rows, rows * new, generate([model], rows, new)
            )
        del model
    adapters = sixteen_adapters()
    models = [og.Model(str(build(DECODER / f"genai-lora-{name}", "fp32", name))) for name in adapters]
    generate(models[:2], 2, 4)  # warm
    emit(
        "onnxruntime-genai fp32",
        "16 adapters: 16 models, 16 generators of 2 rows",
        ROWS,
        ROWS * new,
        generate(models, 2, new),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=["peft", "genai"])
    parser.add_argument("--new-tokens", type=int, default=NEW)
    args = parser.parse_args()
    {"peft": peft, "genai": genai}[args.peer](args.new_tokens)


if __name__ == "__main__":
    main()
