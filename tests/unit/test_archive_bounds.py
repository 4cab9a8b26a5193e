"""What an upload's archive structure and PEFT patterns may make the worker do: the bounds of
adapters/archives.py and formats.PatternMap, checked on the functions themselves."""

from __future__ import annotations

import gzip
import io
import itertools
import re
import struct
import tarfile
import time
import zipfile

import pytest

from ortmux.worker.adapters import archives
from ortmux.worker.adapters.formats import PatternMap
from ortmux.worker.errors import InvalidArgument

# -- patterns --------------------------------------------------------------------------------------

MODULES = [
    "layers.0.self_attn.q_proj",
    "model.layers.10.mlp.up_proj",
    "q_proj",
    "layers",
    ".x",
    "a.",
    "",
    "encoder.prój.v_proj",
]
KEYS = [
    "q_proj",
    "self_attn\\.q_proj",
    "^layers.*",
    "^q_proj",
    "layers",
    "p_proj",
    "\\d+\\.mlp\\.up_proj",
    ".*",
    "",
    "x",
    "(q|v)_proj$",
    "[a-z]+\\.(q|v)_proj",
    "prój\\.v_proj",
    "layers\\.1.*",
    "(?:mlp|self_attn)\\..*",
]


def _peft(pattern: dict[str, float], module: str, default: float) -> float:
    """PEFT's own lookup, with Python's re."""
    return next((value for key, value in pattern.items() if re.match(rf"(.*\.)?({key})$", module)), default)


@pytest.mark.parametrize("keys", [*itertools.permutations(KEYS[:6], 3), tuple(KEYS)])
def test_the_first_matching_key_is_the_one_peft_takes(keys: tuple[str, ...]) -> None:
    pattern = {key: float(index) for index, key in enumerate(keys, start=1)}
    compiled = PatternMap("rank_pattern", pattern)
    assert [compiled.value(module, -1.0) for module in MODULES] == [_peft(pattern, m, -1.0) for m in MODULES]


@pytest.mark.parametrize("key", KEYS)
def test_each_key_matches_what_python_re_matches(key: str) -> None:
    compiled = PatternMap("alpha_pattern", {key: 2.0})
    assert [compiled.value(module, 1.0) for module in MODULES] == [_peft({key: 2.0}, m, 1.0) for m in MODULES]


def test_a_catastrophic_key_is_matched_in_linear_time() -> None:
    compiled = PatternMap("rank_pattern", {"(.*.*)*x": 8, "(a+)+$": 2})
    started = time.monotonic()
    assert compiled.value("layers.0.self_attn.q_proj" * 40, 4) == 4
    assert compiled.value("a" * 1000, 4) == 2
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ({"a)|(b": 1}, "key 'a)|(b' is not a pattern RE2 accepts (unexpected ): a)|(b)"),
        ({"x{1001}": 1}, "(invalid repetition size: {1001})"),
        ({"\ud800": 1}, "surrogates not allowed"),
        ({1: 1}, "keys must be strings of at most 1024 characters"),
        ({"q_proj": 10**400}, "rank_pattern['q_proj'] must be a finite number, got 1000000"),
        ({"q_proj": True}, "rank_pattern['q_proj'] must be a finite number, got True"),
        ([["q_proj", 1]], "rank_pattern must be an object"),
    ],
)
def test_keys_and_values_that_cannot_be_served_are_refused(pattern: object, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        PatternMap("rank_pattern", pattern)
    assert message in caught.value.message
    assert caught.value.field == "rank_pattern"


def test_keys_too_large_together_are_refused_not_compiled_past_the_memory_bound() -> None:
    with pytest.raises(InvalidArgument) as caught:
        PatternMap("rank_pattern", {f".*a.{{20}}b{index}": 1 for index in range(4096)})
    assert "rank_pattern keys need over 32 MiB of RE2 memory" in caught.value.message


def test_module_paths_past_the_bound_are_not_matched() -> None:
    compiled = PatternMap("rank_pattern", {"q_proj": 8})
    assert compiled.value("x." * 509 + "q_proj", 4) == 8  # 1024 characters
    with pytest.raises(InvalidArgument, match="module paths of over 1024 characters"):
        compiled.value("x." * 600 + "q_proj", 4)
    assert PatternMap("rank_pattern", {}).value("x." * 600, 4) == 4  # no map, nothing matched


# -- zip -------------------------------------------------------------------------------------------


def _zip(members: dict[str, bytes], comment: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.comment = comment
    return buffer.getvalue()


def _zip64(data: bytes, entries: int, locator_offset: int | None = None) -> bytes:
    end = data.rfind(b"PK\x05\x06")
    record = bytearray(data[end:])
    size, offset = struct.unpack("<II", bytes(record[12:20]))
    zip64 = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, offset)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, end if locator_offset is None else locator_offset, 1)
    record[8:20] = struct.pack("<HHII", 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    return data[:end] + zip64 + locator + bytes(record)


FILES = {"a/adapter_config.json": b"{}", "a/adapter_model.safetensors": b"w" * 100}


def test_the_end_record_is_found_behind_a_comment_and_in_a_zip_behind_other_bytes() -> None:
    assert set(archives.unpack(_zip(FILES, comment=b"c" * 65535), None, 1 << 20)) == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    crowded = {f"m{index}": b"" for index in range(300)}
    with pytest.raises(InvalidArgument, match="zip archive declares 300 members, over the limit of 256"):
        archives.unpack(_zip(crowded, comment=b"c" * 65535), None, 1 << 20)
    prefixed = b"#!/bin/sh\n" * 100 + _zip(crowded)  # a self-extracting archive's stub
    with pytest.raises(InvalidArgument, match="zip archive declares 300 members"):
        archives.check_zip_directory(prefixed)


def test_a_zip64_record_is_read_wherever_its_locator_or_zipfile_looks() -> None:
    packed = _zip(FILES)
    assert len(archives.unpack(_zip64(packed, 2), None, 1 << 20)) == 2
    with pytest.raises(InvalidArgument, match="declares 70000 members"):
        archives.check_zip_directory(_zip64(packed, 70000))
    with pytest.raises(InvalidArgument, match="declares 70000 members"):  # locator pointing nowhere
        archives.check_zip_directory(_zip64(packed, 70000, locator_offset=1 << 50))
    with pytest.raises(InvalidArgument, match="declares 65535 members"):  # placeholders, no zip64 record
        archives.check_zip_directory(packed[: packed.rfind(b"PK\x05\x06") + 8] + b"\xff" * 4 + packed[-10:])


def test_an_npz_override_named_in_a_multi_file_upload_has_its_directory_bounded_too() -> None:
    from ortmux.worker.adapters import formats

    crowded = _zip({f"t{index}.npy": b"" for index in range(300)})
    with pytest.raises(InvalidArgument, match="zip archive declares 300 members"):
        formats.parse(formats.WEIGHT_OVERRIDE, {"override.npz": crowded})


# -- tar -------------------------------------------------------------------------------------------


def _header(name: bytes, kind: bytes, size: int | None = 0, raw_size: bytes | None = None) -> bytes:
    block = bytearray(512)
    block[: len(name)] = name
    block[100:124] = b"0000644\0" + b"0000000\0" * 2
    block[124:136] = raw_size if raw_size is not None else b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _member(name: bytes, data: bytes) -> bytes:
    return _header(name, b"0", len(data)) + data.ljust(-(-len(data) // 512) * 512, b"\0")


def _pax(records: bytes, kind: bytes = b"x") -> bytes:
    return _header(b"././@PaxHeader", kind, len(records)) + records.ljust(
        -(-len(records) // 512) * 512, b"\0"
    )


def _record(key: str, value: str) -> bytes:
    """A pax record: its length counts its own digits."""
    body = f" {key}={value}\n".encode()
    length = len(body)
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


END = b"\0" * 1024


def _refused(payload: bytes, match: str, max_bytes: int = 1 << 20) -> None:
    with pytest.raises(InvalidArgument, match=match):
        archives.unpack(payload, None, max_bytes)


def test_a_stream_of_members_with_pax_records_unpacks() -> None:
    tar = _pax(_record("path", "dir/" + "long" * 50 + "/adapter_config.json")) + _member(b"x", b"{}")
    tar += _member(b"b/adapter_model.safetensors", b"w" * 700) + END
    assert archives.unpack(gzip.compress(tar), None, 1 << 20) == {
        "adapter_config.json": b"{}",
        "adapter_model.safetensors": b"w" * 700,
    }


def test_headers_are_bounded_one_by_one_in_a_row_and_in_all() -> None:
    _refused(
        gzip.compress(_header(b"././@LongLink", b"L", 1 << 32) + END),
        "of 4294967296 bytes, over the 65536",
    )
    _refused(gzip.compress(_header(b"x", b"0", raw_size=b"\xff" * 12) + END), "declares a negative size")
    _refused(
        gzip.compress(_pax(b"11 a=bcdef\n") * 9 + _member(b"m", b"") + END), "more than 8 extended headers"
    )
    per_member = _pax(_record("comment", "c" * 1000)) * 4
    _refused(gzip.compress((per_member + _member(b"m", b"")) * 205 + END), "more than 1024 header blocks")
    big = _pax(_record("comment", "c" * 60000))
    _refused(gzip.compress((big + _member(b"m", b"")) * 20 + END), "hold more than 1048576 bytes in all")
    glob = _pax(_record("comment", "g" * 9000), kind=b"g")
    _refused(gzip.compress((glob + _member(b"m", b"")) * 2 + END), "pax global headers hold more than 16384")
    _refused(gzip.compress((_member(b"m", b"") * 257) + END), "archive has more than 256 members")


def test_sparse_members_are_refused_before_their_maps_are_read() -> None:
    _refused(gzip.compress(_header(b"s", b"S") + END), "'s' is a sparse file")
    records = (
        _record("GNU.sparse.major", "1") + _record("GNU.sparse.minor", "0") + _record("GNU.sparse.name", "s")
    )
    _refused(gzip.compress(_pax(records) + _member(b"s", b"1\n0\n1\n") + END), "'s' is a sparse file")
    _refused(gzip.compress(_pax(_record("GNU.sparse.map", "0,1")) + _member(b"s", b"w") + END), "sparse file")


def test_decompressed_bytes_are_bounded_whatever_the_members_declare() -> None:
    zeros = gzip.compress(b"\0" * (1 << 20))
    skipped = gzip.compress(_header(b"device", b"Z", 64 << 20)) + zeros * 64 + gzip.compress(END)
    limit = (1 << 20) + archives.TAR_HEADER_SLACK
    _refused(skipped, f"the tar archive expands past {limit} bytes")
    _refused(gzip.compress(_member(b"m", b"w" * 2000) + END), "expands past the 1000-byte limit", 1000)


def test_broken_streams_are_invalid_argument() -> None:
    tar = gzip.compress(_member(b"m", b"w" * 5000) + END)
    for broken in (tar[:-30], tar[:40], b"\x1f\x8b" + b"junk" * 20, tar[:20] + b"\xff" * 50 + tar[70:]):
        _refused(broken, "upload is not a valid tar archive")
    _refused(_pax(b"99999" * 2000 + b" a=b\n") + END, "upload is not a valid tar archive")
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as archive:
        info = tarfile.TarInfo("adapter/adapter_config.json")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"{}"))
    assert archives.unpack(plain.getvalue(), None, 1 << 20) == {"adapter_config.json": b"{}"}
