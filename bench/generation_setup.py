"""What bench/generation.py and its scenarios (bench/generation_scenarios.py) share: the bench
decoder's paths, a worker serving it in its own process, the export made eos-free with a
word-level tokenizer, prompts, warming, and a load's table cells."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from common import OUT, WorkerProcess

DECODER = OUT / "decoder"
DECODER_128K = OUT / "decoder-128k"  # bench/make_decoder.py --vocab 128256


def serve(model_dir: Path, data: Path, extra: list[str]) -> WorkerProcess:
    return WorkerProcess(
        "--http-port",
        "0",
        "--data-dir",
        str(data),
        "--model",
        f"llm={model_dir / 'model.onnx'}",
        "--max-running-sequences",
        "32",
        "--kv-cache-bytes",
        str(8 << 30),
        *extra,
    )


def without_eos(source: Path, target: Path) -> Path:
    """A copy of the export whose config states no eos (generations run to max_new_tokens), with a
    word-level tokenizer whose token ``t<N>`` is id N: the text protocols then carry exactly the
    prompts the native client sends as ids."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    for name in ("config.json", "generation_config.json"):
        path = target / name
        if path.is_file():
            values = json.loads(path.read_text())
            values.pop("eos_token_id", None)
            path.write_text(json.dumps(values))
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = vocab_of(target)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(target / "tokenizer.json"))
    return target


def vocab_of(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


def as_text(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def jobs_of(
    streams: int,
    adapters: list[str],
    prompt: tuple[int, int] = (32, 128),
    count: int | None = None,
    vocab: int = 32000,
) -> list[tuple[list[int], str]]:
    """``count`` generations (two per stream unless given): a random prompt of ``prompt`` tokens
    (shortest, longest) and a random adapter each."""
    rng = np.random.default_rng(streams)
    return [
        (
            rng.integers(3, min(vocab, 32000), size=int(rng.integers(prompt[0], prompt[1] + 1))).tolist(),
            adapters[int(rng.integers(len(adapters)))],
        )
        for _ in range(streams * 2 if count is None else count)
    ]


def load_cells(result: dict) -> list[str]:
    """A load's tokens/s, TTFT p50 / p99 and inter-token p50 / p99, as table cells."""
    return [
        f"{result['tokens_per_second']:.1f}",
        f"{result['ttft_p50']:.0f}",
        f"{result['ttft_p99']:.0f}",
        f"{result['itl_p50']:.1f}",
        f"{result['itl_p99']:.1f}",
    ]


def ready(address: str, decoder: Path, adapters: list[str]) -> None:
    """Register ``adapters`` and warm the worker: the weights' pages, first runs, each adapter."""
    from ortmux.client import Client

    with Client(address, timeout=600) as client:
        for name in adapters:
            client.register_adapter("llm", name, decoder / "adapters" / name, replace=True)
        for name in ["", *adapters]:
            list(client.generate("llm", input_ids=list(range(3, 67)), adapter=name, max_new_tokens=2))
