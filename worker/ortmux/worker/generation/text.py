"""A generation's text as it grows: new token ids turned into the text they add, with stop
strings matched on the decoded text (the stop string itself not returned) and nothing sent that
a later token could still change (an unfinished UTF-8 character, the start of a stop string)."""

from __future__ import annotations

from collections.abc import Sequence

from ortmux.worker.generation.model_files import TextTokenizer

_INCOMPLETE = "\ufffd"  # what a byte-level decoder gives for a character cut in the middle


class TextStream:
    def __init__(self, tokenizer: TextTokenizer | None, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._sent = 0  # characters of the decoded text already given out

    def push(self, token_id: int) -> tuple[str, bool]:
        """The text ``token_id`` adds that is safe to send, and whether a stop string ended it."""
        if self._tokenizer is None:
            return "", False
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids)
        start = max(0, self._sent - max((len(s) for s in self._stop), default=0))
        found = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        if found:
            end = min(found)
            new, self._sent = text[self._sent : end], max(self._sent, end)
            return new, True
        safe = len(text)
        while safe > self._sent and text[safe - 1] == _INCOMPLETE:
            safe -= 1
        for stop in self._stop:  # hold back a tail that may become a stop string
            for length in range(min(len(stop) - 1, safe - self._sent), 0, -1):
                if text[safe - length : safe] == stop[:length]:
                    safe -= length
                    break
        new, self._sent = text[self._sent : safe], max(self._sent, safe)
        return new, False

    def finish(self) -> str:
        """What is left to send when the generation ends for another reason than a stop string."""
        if self._tokenizer is None:
            return ""
        text = self._tokenizer.decode(self._ids).rstrip(_INCOMPLETE)
        new, self._sent = text[self._sent :], len(text)
        return new
