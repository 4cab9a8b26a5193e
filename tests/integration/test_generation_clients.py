"""Generation through the clients users already have, against a real worker, each compared with the
native client's greedy text: the ``openai`` package on the OpenAI-compatible HTTP API (completions
and chat, whole and streamed as server-sent events, adapters by model name) and tritonclient on
Triton's LLM protocol over the Open Inference Protocol (in a venv of its own)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ortmux.client import Client
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.auth import key_digest

from ..conftest import make_venv, worker_settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "generation"
CLIENTS = Path(__file__).resolve().parents[1] / "oip_clients"
KEY = "acme-secret-key"
PROMPT = "the quick brown fox"
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def http_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    root = tmp_path_factory.mktemp("openai")
    model = root / "qwen2"
    shutil.copytree(FIXTURES / "qwen2", model)
    (model / "chat_template.jinja").write_text(TEMPLATE)
    running = start_worker(
        worker_settings(
            root / "data",
            "--model",
            f"qwen2={model / 'model.onnx'}",
            "--http-port",
            "0",
            "--api-key",
            f"{key_digest(KEY)}:acme:tenant",
        )
    )
    with Client(running.address, timeout=60, api_key=KEY) as client:
        client.register_adapter("qwen2", "lora0", FIXTURES / "qwen2-lora0")
    yield running
    running.stop(0)


def _native(worker: Worker, adapter: str = "", **kwargs) -> str:
    with Client(worker.address, timeout=60, api_key=KEY) as client:
        return "".join(
            chunk.text for chunk in client.generate("qwen2", adapter=adapter, max_new_tokens=10, **kwargs)
        )


@pytest.fixture()
def openai_client(http_worker: Worker):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{http_worker.http_port}/v1", api_key=KEY, max_retries=0
    )
    yield client
    client.close()


@pytest.mark.parametrize("model", ["qwen2", "qwen2:lora0"])
def test_openai_completions_equal_the_native_client(http_worker: Worker, openai_client, model: str) -> None:
    adapter = model.partition(":")[2]
    want = _native(http_worker, adapter, prompt=PROMPT)
    whole = openai_client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
    assert whole.choices[0].text == want
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10
    parts = openai_client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(parts)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_openai_chat_uses_the_models_template(http_worker: Worker, openai_client) -> None:
    from tokenizers import Tokenizer

    messages = [{"role": "user", "content": "tokens stream"}]
    tokenizer = Tokenizer.from_file(str(FIXTURES / "qwen2" / "tokenizer.json"))
    ids = tokenizer.encode("user: tokens stream\nassistant:", add_special_tokens=False).ids
    with Client(http_worker.address, timeout=60, api_key=KEY) as native:
        want = "".join(
            c.text for c in native.generate("qwen2", input_ids=ids, adapter="lora0", max_new_tokens=8)
        )
    rendered = openai_client.chat.completions.create(
        model="qwen2:lora0", messages=messages, max_tokens=8, temperature=0
    )
    streamed = openai_client.chat.completions.create(
        model="qwen2:lora0", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert rendered.choices[0].message.role == "assistant"
    assert rendered.choices[0].message.content == text == want
    assert rendered.usage.prompt_tokens == len(ids)


def test_openai_models_and_errors(http_worker: Worker, openai_client) -> None:
    import openai

    assert {m.id for m in openai_client.models.list()} == {"qwen2", "qwen2:lora0"}
    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="qwen2:nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.completions.create(model="qwen2", prompt=PROMPT, max_tokens=2, n=2)
    assert "'n' = 2 is not supported" in str(bad.value)
    with pytest.raises(openai.BadRequestError) as logprobs:
        openai_client.completions.create(model="qwen2", prompt=PROMPT, max_tokens=2, logprobs=2)
    assert "logprobs" in str(logprobs.value)
    stranger = openai.OpenAI(
        base_url=f"http://127.0.0.1:{http_worker.http_port}/v1", api_key="wrong", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model="qwen2", prompt=PROMPT, max_tokens=2)
    with urllib.request.urlopen(f"http://127.0.0.1:{http_worker.http_port}/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}


def test_a_model_without_a_chat_template_answers_chat_with_a_400(tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    running = start_worker(
        worker_settings(tmp_path, "--model", f"gpt2={FIXTURES / 'gpt2' / 'model.onnx'}", "--http-port", "0")
    )
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{running.http_port}/v1", api_key="x", max_retries=0
        )
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="gpt2", messages=[{"role": "user", "content": "hi"}])
        assert "has no chat template" in str(caught.value)
    finally:
        running.stop(0)


@pytest.mark.slow
def test_tritonclient_generates_with_the_llm_protocol(http_worker: Worker, tmp_path: Path) -> None:
    python = make_venv(tmp_path / "venv", "tritonclient[grpc]==2.73.0")
    result = subprocess.run(
        [
            str(python),
            str(CLIENTS / "triton_llm_checks.py"),
            http_worker.address,
            KEY,
            "qwen2",
            "lora0",
            PROMPT,
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    adapted, base = _native(http_worker, "lora0", prompt=PROMPT), _native(http_worker, prompt=PROMPT)
    for case in ("stream_lora_name", "stream_qualified"):
        texts, extras = found[case]
        assert "".join(texts) == adapted, case
        assert len(texts) == 10 and extras["finish_reason"] == "length" and extras["num_output_tokens"] == 10
    assert "".join(found["stream_base"][0]) == base
    assert found["not_streamed"][0] == [adapted]
    assert found["infer_echo"] == PROMPT + adapted
    assert found["decoupled"] is True
    assert "text_input" in found["config_inputs"] and "text_output" in found["metadata_outputs"]
    assert found["bad_json"].startswith("StatusCode.INVALID_ARGUMENT")
    assert "beam_width" in found["unknown_key"]
    assert found["unknown_adapter"].startswith("StatusCode.NOT_FOUND")
