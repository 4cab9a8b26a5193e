"""TextStream: the text each new token adds, told from a window of recent ids, against the
tokenizer's decoding of the whole sequence; stop strings and what is held back.

Besides the generation fixtures' tokenizer, the tokenizers are trained here. The trainer breaks
ties between equally frequent characters differently from one run to the next, so the messages of
the random tests name the tokenizer file (kept under pytest's basetemp) with the ids."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ortmux.worker.generation.model_files import TextTokenizer
from ortmux.worker.generation.text import TextStream

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "generation" / "qwen2" / "tokenizer.json"
CUT = "\ufffd"

CORPUS = [
    "Hello wörld, ça va? Größe über naïve café, déjà vu à Zürich.",
    "日本語のテキストと中文字符，还有한국어 문장도 있습니다。",  # noqa: RUF001
    "emoji 🎉🚀👍🏽 and more ✨ — a family 👨‍👩‍👧 on a trip 🏔️.",
    "Prices: €100, £50, ¥3000, ₹20; math ∑ ∫ √2 ≈ 1.414 ≤ π.",
    "Ελληνικά κείμενα και русский текст рядом с עברית ועربية.",  # noqa: RUF001
    "the quick brown fox jumps over the lazy dog\n\tand back again",
]


@dataclasses.dataclass
class Case:
    name: str
    tokenizer: TextTokenizer
    raw: Tokenizer
    special: list[int]  # ids decode leaves out
    path: Path

    def encode(self, text: str) -> list[int]:
        return self.raw.encode(text, add_special_tokens=False).ids


def _byte_level(directory: Path) -> Case:
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS * 4, trainer)
    raw.add_tokens(["<tool>"])  # an added token that is not special: decoded as text
    path = directory / "byte_level.json"
    raw.save(str(path))
    special = [raw.token_to_id("<|im_start|>"), raw.token_to_id("<|endoftext|>")]
    return Case("byte-level", TextTokenizer(path), raw, special, path)


def _sentencepiece(directory: Path, style: str) -> Case:
    """A BPE with byte fallback as Llama and Mistral tokenizer.json files have it: the vocabulary
    starts with <unk>, <s>, </s> and the 256 byte tokens, and characters it lacks become bytes."""
    if style == "llama":  # spaces made "▁" by the normalizer, the first one prepended
        normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        pre_tokenizer = None
    else:
        normalizer = None
        pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=style, split=True)
    base = Tokenizer(models.BPE())
    base.normalizer, base.pre_tokenizer = normalizer, pre_tokenizer
    base.train_from_iterator(
        CORPUS * 4, trainers.BpeTrainer(vocab_size=260, limit_alphabet=40, show_progress=False)
    )
    trained = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece, _id in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    raw = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.normalizer, raw.pre_tokenizer = normalizer, pre_tokenizer
    if style == "always":  # the Metaspace decoder, which drops the first token's "▁"
        raw.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always")]
        )
    else:
        raw.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    raw.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    path = directory / f"sentencepiece_{style}.json"
    raw.save(str(path))
    return Case(f"sentencepiece-{style}", TextTokenizer(path), raw, [0, 1, 2], path)


def _fixture() -> Case:
    raw = Tokenizer.from_file(str(FIXTURE))
    return Case("qwen2-fixture", TextTokenizer(FIXTURE), raw, [0, 1, 2], FIXTURE)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    directory = tmp_path_factory.mktemp("tokenizers")
    made = [_fixture(), _byte_level(directory)]
    made += [_sentencepiece(directory, style) for style in ("llama", "first", "always")]
    return {case.name: case for case in made}


BYTE_LEVEL = ["qwen2-fixture", "byte-level"]
SENTENCEPIECE = ["sentencepiece-llama", "sentencepiece-first", "sentencepiece-always"]
ALL = BYTE_LEVEL + SENTENCEPIECE


def stream(tokenizer: TextTokenizer | None, ids: Sequence[int], stop: Sequence[str] = ()) -> list[str]:
    """What each push returns until a stop string, then what finish adds (empty after a stop)."""
    text = TextStream(tokenizer, stop)
    out = []
    for token_id in ids:
        piece, stopped = text.push(token_id)
        out.append(piece)
        if stopped:
            return [*out, ""]
    return [*out, text.finish()]


def random_ids(case: Case, rng: random.Random) -> list[int]:
    """Ids drawn from all of the vocabulary, or the ids of some text, with special tokens between."""
    if rng.random() < 0.5:
        ids = [rng.randrange(case.raw.get_vocab_size()) for _ in range(rng.randint(1, 50))]
    else:
        line = rng.choice(CORPUS)
        start = rng.randrange(len(line))
        ids = case.encode(line[start : start + rng.randint(1, 40)])
    for _ in range(rng.randint(0, 3)):
        ids.insert(rng.randint(0, len(ids)), rng.choice(case.special))
    return ids


def is_byte(case: Case, token_id: int) -> bool:
    piece = case.raw.id_to_token(token_id)
    return piece is not None and len(piece) == 6 and piece.startswith("<0x")


class FirstDecodedStream:
    """The stream as it was before the window: the whole sequence decoded again at every token."""

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()) -> None:
        self._tokenizer, self._stop = tokenizer, [s for s in stop if s]
        self._ids: list[int] = []
        self._sent = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids)
        start = max(0, self._sent - max((len(s) for s in self._stop), default=0))
        found = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        if found:
            end = min(found)
            new, self._sent = text[self._sent : end], max(self._sent, end)
            return new, True
        safe = len(text)
        while safe > self._sent and text[safe - 1] == CUT:
            safe -= 1
        for stop in self._stop:
            for length in range(min(len(stop) - 1, safe - self._sent), 0, -1):
                if text[safe - length : safe] == stop[:length]:
                    safe -= length
                    break
        new, self._sent = text[self._sent : safe], max(self._sent, safe)
        return new, False

    def finish(self) -> str:
        text = self._tokenizer.decode(self._ids).rstrip(CUT)
        new, self._sent = text[self._sent :], len(text)
        return new


def test_the_tokenizers_cut_characters_and_fall_back_to_bytes(cases: dict[str, Case]) -> None:
    """The cases the window has to get right are there: a character's bytes in two tokens, and
    characters the vocabulary lacks told as <0xNN> tokens."""
    for name in BYTE_LEVEL:
        case = cases[name]
        ids = case.encode(" ".join(CORPUS))
        assert any(case.tokenizer.decode(ids[:k]).endswith(CUT) for k in range(len(ids))), name
    for name in SENTENCEPIECE:
        case = cases[name]
        assert sum(is_byte(case, i) for i in case.encode(" ".join(CORPUS))) > 20, name
        assert case.tokenizer.decode(case.encode("Hi 🎉 there")) == "Hi 🎉 there", name


@pytest.mark.parametrize("name", ALL)
def test_the_pieces_add_up_to_the_decoded_text(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    rng = random.Random(f"pieces-{name}")
    for _ in range(400):
        ids = random_ids(case, rng)
        want = case.tokenizer.decode(ids).rstrip(CUT)  # an unfinished character at the end is not sent
        assert "".join(stream(case.tokenizer, ids)) == want, (ids, case.path)


@pytest.mark.parametrize("name", ALL)
def test_text_is_sent_as_soon_as_no_later_token_can_change_it(cases: dict[str, Case], name: str) -> None:
    """After each token the text sent is the decoded text so far less an unfinished character;
    a run of byte tokens waits for the token after it, since a later byte may turn it to U+FFFD."""
    case = cases[name]
    rng = random.Random(f"prompt-{name}")
    for _ in range(200):
        ids = random_ids(case, rng)
        text, sent = TextStream(case.tokenizer), ""
        last_is_byte = False
        for k, token_id in enumerate(ids, 1):
            sent += text.push(token_id)[0]
            if token_id not in case.special:
                last_is_byte = is_byte(case, token_id)
            if not last_is_byte:
                assert sent == case.tokenizer.decode(ids[:k]).rstrip(CUT), (ids, k, case.path)


def random_stops(full: str, rng: random.Random, least: int) -> list[str]:
    """``least`` to 3 stop strings cut from ``full`` (the text the ids decode to)."""
    stops = []
    for _ in range(rng.randint(least, 3)):
        start = rng.randrange(len(full) + 1)
        stops.append(full[start : start + rng.randint(1, 5)].replace(CUT, "") or "zz")
    return stops


@pytest.mark.parametrize("name", BYTE_LEVEL)
def test_each_push_is_what_decoding_from_the_start_gave(cases: dict[str, Case], name: str) -> None:
    """On byte-level tokenizers the window gives, token by token, what decoding the whole
    sequence at every token gave, stop strings and hold-back included."""
    case = cases[name]
    rng = random.Random(f"same-{name}")
    for _ in range(300):
        ids = random_ids(case, rng)
        full = case.tokenizer.decode(ids)
        stop = random_stops(full, rng, least=0)
        new, old = TextStream(case.tokenizer, stop), FirstDecodedStream(case.tokenizer, stop)
        for token_id in ids:
            got = new.push(token_id)
            assert got == old.push(token_id), (ids, stop, case.path)
            if got[1]:
                break
        else:
            assert new.finish() == old.finish(), (ids, stop, case.path)


@pytest.mark.parametrize("name", ALL)
def test_a_stop_string_ends_the_text_at_the_token_that_makes_it(cases: dict[str, Case], name: str) -> None:
    """The generation stops at the first token after which the decoded text holds a stop string,
    inside a run of byte tokens too, and the text sent is the decoded text up to the first one."""
    case = cases[name]
    rng = random.Random(f"stop-{name}")
    for _ in range(300):
        ids = random_ids(case, rng)
        full = case.tokenizer.decode(ids)
        stop = random_stops(full, rng, least=1)
        want, want_at = full.rstrip(CUT), None
        for k in range(1, len(ids) + 1):
            so_far = case.tokenizer.decode(ids[:k])
            found = [i for i in (so_far.find(s) for s in stop) if i >= 0]
            if found:
                want, want_at = so_far[: min(found)], k
                break
        text, out, stopped_at = TextStream(case.tokenizer, stop), "", None
        for k, token_id in enumerate(ids, 1):
            piece, stopped = text.push(token_id)
            out += piece
            if stopped:
                stopped_at = k
                break
        if stopped_at is None:
            out += text.finish()
        else:
            assert text.push(ids[0]) == ("", True) and text.finish() == ""  # nothing after the stop
        assert (out, stopped_at) == (want, want_at), (ids, stop, case.path)


def pushes(case: Case, text: str, stop: Sequence[str]) -> tuple[list[str], list[bool], str]:
    """What each push of the text's ids gives until a stop string, and then what finish gives."""
    stream_ = TextStream(case.tokenizer, stop)
    texts, stopped = [], []
    for token_id in case.encode(text):
        piece, ended = stream_.push(token_id)
        texts.append(piece)
        stopped.append(ended)
        if ended:
            break
    return texts, stopped, stream_.finish()


def test_a_stop_string_split_across_tokens(cases: dict[str, Case]) -> None:
    case = cases["qwen2-fixture"]
    ids = case.encode("the quick brown fox jumps")
    texts = [case.tokenizer.decode([i]) for i in ids]
    assert not any("ck bro" in t for t in texts)  # no one token holds it
    stream_ = TextStream(case.tokenizer, ["ck bro"])
    out, stopped = [], False
    for token_id in ids:
        piece, stopped = stream_.push(token_id)
        out.append(piece)
        if stopped:
            break
    assert stopped and "".join(out) == "the qui"
    assert "ck bro" in case.tokenizer.decode(ids[: len(out)])
    assert "ck bro" not in case.tokenizer.decode(ids[: len(out) - 1])
    assert stream_.push(ids[-1]) == ("", True) and stream_.finish() == ""  # nothing after the stop


@pytest.mark.parametrize("name", ALL)
def test_a_stop_string_in_text_of_characters_cut_in_bytes(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    line = CORPUS[1]
    for stop in ["字符", "한국", "。"]:
        texts, stopped, rest = pushes(case, line, [stop])
        assert "".join(texts) == line[: line.index(stop)] and stopped[-1] and rest == "", (name, stop)
    texts, stopped, rest = pushes(case, "emoji 🎉 done", ["🎉"])
    assert "".join(texts) == "emoji " and stopped[-1] and rest == ""


@pytest.mark.parametrize("name", SENTENCEPIECE)
def test_a_stop_string_in_byte_tokens_stops_at_its_last_byte(cases: dict[str, Case], name: str) -> None:
    """The token that completes the stop string ends the generation, not the token after it."""
    case = cases[name]
    ids = case.encode("go 🎉 now")
    last = next(k for k in range(len(ids)) if "🎉" in case.tokenizer.decode(ids[: k + 1]))
    assert is_byte(case, ids[last]) and not is_byte(case, ids[last + 1])
    stream_ = TextStream(case.tokenizer, ["🎉"])
    got = [stream_.push(i) for i in ids[: last + 1]]
    assert [s for _t, s in got] == [False] * last + [True]
    assert "".join(t for t, _s in got) == "go "


def test_the_earliest_of_several_stop_strings_wins(cases: dict[str, Case]) -> None:
    for name in ALL:
        case = cases[name]
        texts, stopped, _rest = pushes(case, "the quick brown fox jumps over", ["over", "fox", "quick b"])
        assert "".join(texts) == "the " and stopped[-1] and not any(stopped[:-1]), name


def test_text_that_may_start_a_stop_string_is_held_until_finish(cases: dict[str, Case]) -> None:
    for name in ALL:
        case = cases[name]
        texts, stopped, rest = pushes(case, "the quick brown fox jumps", ["jumps over"])
        assert "".join(texts) == "the quick brown fox " and not any(stopped), name
        assert rest == "jumps", name
        texts, stopped, rest = pushes(case, "the quick brown fox jumps", ["jumps over", "fox x"])
        assert "".join(texts) == "the quick brown " and rest == "fox jumps", name


def test_special_tokens_are_left_out(cases: dict[str, Case]) -> None:
    for name in ALL:
        case = cases[name]
        eos = case.special[-1]
        ids = [*case.encode("Größe 🎉"), eos, eos, *case.encode(" über 日本")]
        text = case.tokenizer.decode(ids)
        assert "".join(stream(case.tokenizer, ids)) == text and "Größe 🎉" in text, name
        assert case.raw.id_to_token(eos) not in text
        ids = case.encode("a <tool> b")  # an added token that is not special is text
        assert "".join(stream(case.tokenizer, ids)) == case.tokenizer.decode(ids), name
        assert "<tool>" in case.tokenizer.decode(ids), name


def test_an_unfinished_character_at_the_end_is_not_sent(cases: dict[str, Case]) -> None:
    for name in ALL:
        case = cases[name]
        ids = case.encode("ab 😀")[:-1]  # the last byte of the emoji left out
        assert case.tokenizer.decode(ids).endswith(CUT), name
        assert "".join(stream(case.tokenizer, ids)) == "ab ", name


def test_a_model_without_a_tokenizer_gives_no_text() -> None:
    text = TextStream(None, ["x"])
    assert [text.push(5), text.push(6)] == [("", False), ("", False)] and text.finish() == ""


class CountingTokenizer(TextTokenizer):
    """A tokenizer that notes how many ids each decode is given."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.sizes: list[int] = []

    def decode(self, ids: Sequence[int]) -> str:
        self.sizes.append(len(ids))
        return super().decode(ids)


@pytest.mark.parametrize("name", ALL)
def test_a_push_decodes_a_few_recent_ids_however_long_the_text(
    cases: dict[str, Case], name: str, tmp_path: Path
) -> None:
    """The ids each decode is given do not grow with the text: ten times the text, the same
    most and about the same on average (a run of byte tokens is decoded whole once it ends)."""
    case = cases[name]
    path = tmp_path / "tokenizer.json"
    case.raw.save(str(path))
    eos = case.special[-1]
    seen = []
    for times in (3, 30):
        ids = case.encode(" ".join(CORPUS * times))
        ids = [i for k, i in enumerate(ids) for i in ((i, eos) if k % 50 == 0 else (i,))]
        counting = CountingTokenizer(path)
        assert "".join(stream(counting, ids, ["never appears", "zzz"])) == case.tokenizer.decode(ids)
        seen.append((max(counting.sizes), sum(counting.sizes) / len(ids)))
    (most, mean), (most_10x, mean_10x) = seen
    runs = "".join("b" if is_byte(case, i) else " " for i in ids if i not in case.special).split()
    assert most_10x == most <= max(map(len, runs), default=0) + 16
    assert mean_10x < 1.1 * mean < 8
