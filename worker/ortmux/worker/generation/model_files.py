"""What the files Optimum writes beside a decoder say about generating: eos, bos and pad ids and
the context length (``config.json``, ``generation_config.json``), and the tokenizer
(``tokenizer.json``, through the ``tokenizers`` library). Sampling defaults are not taken from
there: they come with each request."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from ortmux.worker.errors import InvalidArgument

log = logging.getLogger(__name__)

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    eos_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    pad_id: int | None = None
    context_length: int = 0  # 0: not stated
    # The attention's sliding window (Mistral's ``sliding_window``; 0: none), or why the
    # config's windows are not one the paged kernel applies ("" when they are)
    sliding_window: int = 0
    window_problem: str = ""


def read_generation_config(model_path: Path) -> GenerationConfig:
    """The ids and context length the model's config files state (generation_config.json wins)."""
    values: dict = {}
    for name in ("config.json", "generation_config.json"):
        try:
            loaded = json.loads((model_path.parent / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(loaded, dict):
            values.update({key: value for key, value in loaded.items() if value is not None})
    eos = values.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if isinstance(eos, int) else ()
    context = next((values[key] for key in _CONTEXT_KEYS if isinstance(values.get(key), int)), 0)
    window, window_problem = _sliding_window(values)
    return GenerationConfig(
        sliding_window=window,
        window_problem=window_problem,
        eos_ids=tuple(int(i) for i in eos_ids if isinstance(i, int)),
        bos_id=values.get("bos_token_id") if isinstance(values.get("bos_token_id"), int) else None,
        pad_id=values.get("pad_token_id") if isinstance(values.get("pad_token_id"), int) else None,
        context_length=int(context),
    )


def _sliding_window(values: dict) -> tuple[int, str]:
    window = values.get("sliding_window")
    if not isinstance(window, int) or window <= 0 or values.get("use_sliding_window") is False:
        return 0, ""
    layers = values.get("num_hidden_layers")
    first = values.get("max_window_layers")
    if isinstance(first, int) and isinstance(layers, int) and 0 < first < layers:
        return 0, f"its config windows layers from {first} on only"
    if isinstance(values.get("layer_types"), list) and len(set(values["layer_types"])) > 1:
        return 0, "its config gives layers different attention types"
    return window, ""


class TextTokenizer:
    """A model's tokenizer: text to ids as ``tokenizer(prompt)`` does (special tokens added), and
    ids back to text (special tokens left out)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def beside(cls, model_path: Path) -> TextTokenizer | None:
        path = model_path.parent / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            return cls(path)
        except Exception as exc:  # a file the tokenizers library cannot read
            log.warning("tokenizer %s does not load (%s); the model takes token ids only", path, exc)
            return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: no text a tokenizer can read
            raise InvalidArgument(
                f"the prompt is not valid Unicode text: {exc.reason}", field="prompt"
            ) from None
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def piece(self, token_id: int) -> str | None:
        """The vocabulary entry ``decode`` turns ``token_id`` into text from, or None for an id it
        leaves out (a special token, or one outside the vocabulary)."""
        piece = self._tokenizer.id_to_token(token_id)
        return None if piece is None or piece in self._special_pieces else piece

    @functools.cached_property
    def _special_pieces(self) -> frozenset[str]:
        added = self._tokenizer.get_added_tokens_decoder().values()
        return frozenset(token.content for token in added if token.special)
