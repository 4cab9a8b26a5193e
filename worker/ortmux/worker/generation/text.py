"""A generation's text as it grows: new token ids turned into the text they add, with stop
strings matched on the decoded text (the stop string itself not returned) and nothing sent that
a later token could still change (an unfinished UTF-8 character, the start of a stop string).

A token costs the decoding of a few recent ids, not of the whole generation. The ids are decoded
in a window that starts with the ids of the text last given out: the window's text less the text
of those ids is what the new ids add, so a decoder that treats the first token of what it decodes
apart (Metaspace, or a ``Strip`` of the leading space as Llama and Mistral files have it) does so
on both sides of that difference. The window moves on once its text no longer ends in U+FFFD, the
mark a byte-level decoder gives to a character cut in the middle; what comes before that mark is
given out at once.

That window is this module's own rather than ``tokenizers.decoders.DecodeStream``, which works the
same way but falls short in three places. A ``ByteFallback`` run of ``<0xNN>`` tokens is one piece
of text to that decoder: valid UTF-8 as a whole, or one U+FFFD a byte when not, so a byte that
comes after a complete character can turn that character into U+FFFD again; DecodeStream has by
then given the character out, and raises on the next token because the text no longer starts with
it. Here a run's text waits for the run to end (the next token that is not a byte), and stop
strings are matched on what each whole character of the run would read if the run ended there,
which is the generation's text if that stop string ends it. That character's text is the
difference between decoding it with the character before and decoding that one alone, so a token
costs no more in a long run than in a short one, until the run ends and is decoded whole once.
Special tokens, which ``decode`` leaves out, stay out of the window altogether, so a run of them
costs nothing and leaves the window as it was. And DecodeStream keeps what it holds back to
itself, where ``finish`` must give out what the last ids add.

For any ids, what ``push`` returns and then ``finish`` adds up to ``TextTokenizer.decode`` of them
when no stop string is met, less an unfinished character at the very end. Stop strings are matched
on the text held back (at most one character less than the longest stop string) and the new text,
never on the text already given out."""

from __future__ import annotations

import codecs
import dataclasses
import re
from collections.abc import Sequence

from ortmux.worker.generation.model_files import TextTokenizer

_INCOMPLETE = "\ufffd"  # what a decoder gives for a character cut in the middle
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # what the ByteFallback decoder reads as one byte


@dataclasses.dataclass
class _Run:
    """The byte tokens the window ends with, read as UTF-8 while they are valid so far."""

    previous: int  # where the last whole character starts in the window (the token before at first)
    start: int  # where the character being read starts
    utf8: codecs.IncrementalDecoder = dataclasses.field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("strict")
    )
    valid: bool = True


class _Decoder:
    """The text of a growing sequence of ids as ``TextTokenizer.decode`` gives it for the whole
    sequence, told a piece at a time from a window of recent ids."""

    def __init__(self, tokenizer: TextTokenizer, runs_ahead: bool) -> None:
        self._tokenizer = tokenizer
        self._runs_ahead = runs_ahead  # whether to tell what a run of byte tokens would read
        self._ids: list[int] = []  # the ids of the text last given out, then the ids added since
        self._read = 0  # how many of the window's ids are of the text last given out
        self._context = ""  # the text of those ids, decoded on their own
        self._given = 0  # characters given out past the context (the text before a cut character)
        self._run: _Run | None = None

    def add(self, token_id: int) -> tuple[str, str]:
        """The text ``token_id`` adds that no later id can change, and, inside a run of byte
        tokens, the text it adds if the run ends with it."""
        piece = self._tokenizer.piece(token_id)
        if piece is None:  # decode leaves it out
            return "", ""
        self._ids.append(token_id)
        if _BYTE_PIECE.fullmatch(piece):
            return "", self._byte(int(piece[3:5], 16))
        self._run = None
        text = self._tokenizer.decode(self._ids)
        start = len(self._context) + self._given
        if text.endswith(_INCOMPLETE):  # what comes before the cut character is settled
            safe = len(text.rstrip(_INCOMPLETE))
            if safe <= start:
                return "", ""
            self._given = safe - len(self._context)
            return text[start:safe], ""
        if len(text) <= len(self._context):  # nothing yet (a token with no text of its own)
            return "", ""
        self._ids = self._ids[self._read :]
        self._context = self._tokenizer.decode(self._ids)
        self._read = len(self._ids)
        self._given = 0
        return text[start:], ""

    def _byte(self, value: int) -> str:
        """What the run's text gains with one more byte if the run ends there: a character
        when the byte completes one, nothing when the run is not valid UTF-8 (its text is then
        U+FFFD for every byte, whatever follows)."""
        index = len(self._ids) - 1
        if self._run is None:
            # after a character cut in the middle, the run's text is not told ahead
            told = self._runs_ahead and len(self._context) + self._given == len(
                self._tokenizer.decode(self._ids[:index])
            )
            self._run = _Run(previous=max(index - 1, 0), start=index, valid=told)
        run = self._run
        if not run.valid:
            return ""
        try:
            if not run.utf8.decode(bytes((value,))):
                return ""
        except UnicodeDecodeError:
            run.valid = False
            return ""
        with_it = self._tokenizer.decode(self._ids[run.previous :])
        before = self._tokenizer.decode(self._ids[run.previous : run.start])
        run.previous, run.start = run.start, index + 1
        return with_it[len(before) :]

    @property
    def in_run(self) -> bool:
        """Whether the window ends with byte tokens."""
        return self._run is not None

    def rest(self) -> str:
        """What the ids not yet told add if the sequence ends with them, an unfinished character
        at the end left out."""
        if len(self._ids) == self._read:
            return ""
        text = self._tokenizer.decode(self._ids).rstrip(_INCOMPLETE)
        return text[len(self._context) + self._given :]


class TextStream:
    """The text of one generation, a token at a time, ended by the first stop string in it."""

    def __init__(self, tokenizer: TextTokenizer | None, stop: Sequence[str] = ()) -> None:
        self._stop = [s for s in stop if s]
        self._decoder = _Decoder(tokenizer, bool(self._stop)) if tokenizer is not None else None
        self._reach = max((len(s) for s in self._stop), default=1) - 1  # the text a match may start in
        self._held = ""  # text not given out yet: it may be the start of a stop string
        self._ahead: list[str] = []  # the text of the byte run under way, if it ends where it is
        self._tail = ""  # the last characters of the held text and that text, for matching
        self._stopped = False
        self._finished = False

    def push(self, token_id: int) -> tuple[str, bool]:
        """The text ``token_id`` adds that is safe to send, and whether a stop string ended it."""
        if self._decoder is None or self._stopped or self._finished:
            return "", self._stopped
        new, ahead = self._decoder.add(token_id)
        if ahead:
            return self._run_ahead(ahead)
        if not self._decoder.in_run:
            self._ahead = []
        if not new:
            return "", False
        text = self._held + new
        end = self._stop_at(text)
        if end is not None:
            self._stopped, self._held = True, ""
            return text[:end], True
        safe = len(text)
        for stop in self._stop:  # hold back a tail that may become a stop string
            for length in range(min(len(stop) - 1, safe), 0, -1):
                if text[safe - length : safe] == stop[:length]:
                    safe -= length
                    break
        self._held = text[safe:]
        return text[:safe], False

    def _run_ahead(self, new: str) -> tuple[str, bool]:
        """A stop string met in the text of a byte run if the run ends where it is; the run's
        text is sent when the run ends."""
        if not self._ahead:
            self._tail = self._held
        window = self._tail + new
        end = self._stop_at(window)
        if end is not None:
            text = self._held + "".join(self._ahead) + new
            self._stopped, self._held, self._ahead = True, "", []
            return text[: len(text) - len(window) + end], True
        self._ahead.append(new)
        self._tail = window[-self._reach :] if self._reach else ""
        return "", False

    def finish(self) -> str:
        """What is left to send when the generation ends for another reason than a stop string;
        the stream gives nothing more after it."""
        if self._decoder is None or self._stopped or self._finished:
            return ""
        self._finished = True
        text = self._held + self._decoder.rest()
        self._held, self._ahead = "", []
        end = self._stop_at(text)
        return text if end is None else text[:end]

    def _stop_at(self, text: str) -> int | None:
        """Where the first stop string in ``text`` starts, if one is there."""
        found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(found) if found else None
