"""Chat prompts: a conversation rendered with the model's own chat template
(``chat_template.jinja`` beside it, or ``chat_template`` in ``tokenizer_config.json``, as
transformers saves them) in a sandboxed Jinja2 environment, with ``add_generation_prompt``. The
rendered text already holds the template's special tokens, so it is tokenized without adding them
again.

A template that does not compile (or cannot be read) is the model's problem alone: the model still
lists and serves completions, and its chat requests are answered FAILED_PRECONDITION saying why."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from ortmux.worker.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)


class ChatTemplate:
    def __init__(self, source: str, special: Mapping[str, str]) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        self._special = dict(special)
        self.problem = ""  # why the template cannot serve ("" when it can)
        try:
            self._template = environment.from_string(source)
        except Exception as exc:  # a syntax error, an unknown tag or filter, ...
            self.problem = f"the model's chat template does not compile: {exc}"

    @classmethod
    def beside(cls, model_path: Path) -> ChatTemplate | None:
        """The model's template, if it has one."""
        directory = model_path.parent
        config: dict = {}
        try:
            loaded = json.loads((directory / "tokenizer_config.json").read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            pass
        special = {
            key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        path = directory / "chat_template.jinja"
        try:
            source = path.read_text() if path.is_file() else config.get("chat_template")
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("chat template %s cannot be read (%s); chat requests are refused", path, exc)
            broken = cls("", special)
            broken.problem = f"the model's chat template cannot be read: {exc}"
            return broken
        if isinstance(source, list):  # named templates: the default one
            named = [t for t in source if isinstance(t, dict)]
            source = next((t.get("template") for t in named if t.get("name") == "default"), None)
        if not isinstance(source, str) or not source:
            return None
        template = cls(source, special)
        if template.problem:
            log.warning("model at %s: %s; chat requests are refused", model_path, template.problem)
        return template

    def render(self, messages: Sequence[Mapping[str, object]]) -> str:
        if self.problem:
            raise FailedPrecondition(self.problem, field="messages")
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=True, **self._special)
        except InvalidArgument:
            raise
        except Exception as exc:  # the template refused these messages (or failed on them)
            raise InvalidArgument(f"the model's chat template cannot render these messages: {exc}") from None


def _token_text(value: object) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _raise(message: str) -> None:
    raise InvalidArgument(f"the model's chat template refused the messages: {message}", field="messages")
