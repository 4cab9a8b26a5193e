"""Hostile adapter uploads on real workers: a PEFT pattern, a zip directory or a tar header that
once froze the worker or filled its memory is INVALID_ARGUMENT at once, and the worker answers
everyone else meanwhile. Two tests use a worker in a process of its own: one a backtracking regex
froze (the interpreter lock held, this process could not have timed out), one whose peak memory
is read from its /proc entries.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import struct
import subprocess
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ortmux.client import Client, OrtmuxError
from ortmux.worker.adapters import safetensors

from ..conftest import serve_process
from ..demo_adapters import demo_weight, merged_reference, write_peft

IDS = np.array([[5, 17, 256, 999, 3], [1, 2, 3, 4, 5]], dtype=np.int64)


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(OrtmuxError) as caught:
        call()
    return caught.value.code, caught.value.message


def _status_of(pid: int, key: str) -> int:
    """A /proc/PID/status memory line (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _health(address: str, timeout: float) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def _configure(peft: Path, **fields: object) -> Path:
    config = json.loads((peft / "adapter_config.json").read_text())
    (peft / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return peft


def _upload(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def own_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, str]]:
    process, address = serve_process(tmp_path_factory.mktemp("hostile-uploads"))
    yield process, address
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:  # a worker frozen under the interpreter lock
        process.kill()
        process.wait(15)


@pytest.fixture()
def registered(client: Client) -> Iterator[list[str]]:
    """Ids registered on the session worker during a test; deleted after it."""
    ids: list[str] = []
    yield ids
    for adapter_id in ids:
        client.delete_adapter("demo", adapter_id)


# -- rank_pattern / alpha_pattern ------------------------------------------------------------------


def test_a_catastrophic_pattern_neither_freezes_the_worker_nor_stalls_the_upload(
    own_worker: tuple[subprocess.Popen, str], tmp_path: Path
) -> None:
    """``(.*.*)*x`` against ``layers.0.self_attn.q_proj`` backtracks for minutes in Python's re
    (no module holds an x), holding the interpreter lock: health checks and listings stalled with
    the upload. Under RE2 it matches nothing at once: the adapter registers at its default rank,
    and the worker answered the calls made while the upload was under way."""
    _process, address = own_worker
    peft = _configure(write_peft(tmp_path / "peft"), rank_pattern={"(.*.*)*x": 16, "(a|aa)+$": 16})
    with Client(address, timeout=60) as client:
        outcome: dict[str, object] = {}

        def upload() -> None:
            try:
                outcome["info"] = client.register_adapter("demo", "catastrophic", peft, timeout=60)
            except OrtmuxError as exc:
                outcome["error"] = exc

        uploader = threading.Thread(target=upload)
        uploader.start()
        answered, deadline = 0, time.monotonic() + 60
        while (answered == 0 or uploader.is_alive()) and time.monotonic() < deadline:
            assert _health(address, timeout=5) == health_pb2.HealthCheckResponse.SERVING
            assert [info.name for info in client.list_models(timeout=5)] == ["demo"]
            answered += 1
            time.sleep(0.05)
        uploader.join(10)
        assert not uploader.is_alive(), "the upload did not finish within a minute"
        assert "error" not in outcome, outcome.get("error")
        assert outcome["info"].rank == 4  # type: ignore[attr-defined]
        assert client.infer("demo", {"input_ids": IDS}, adapter="catastrophic")["logits"].shape == (
            2,
            5,
            1000,
        )


@pytest.mark.parametrize(
    ("field", "key", "reason"),
    [
        ("rank_pattern", "(unclosed", "missing ): (unclosed"),
        ("rank_pattern", "(a)\\1", "invalid escape sequence: \\1"),
        ("alpha_pattern", "(?<=self_attn\\.)q_proj", "invalid perl operator: (?<="),
    ],
)
def test_a_pattern_re2_refuses_is_invalid_argument_naming_it(
    client: Client, tmp_path: Path, field: str, key: str, reason: str
) -> None:
    peft = _configure(write_peft(tmp_path / "peft"), **{field: {"q_proj": 4, key: 4}})
    code, message = _code(lambda: client.register_adapter("demo", f"bad-{field}-{len(key)}", peft))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"adapter_config.json: {field} key {key!r} is not a pattern RE2 accepts ({reason})" in message
    assert "patterns use RE2 syntax (no backreferences or lookaround)" in message


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ({f"k{i}": 4 for i in range(4097)}, "rank_pattern has 4097 keys, over the limit of 4096"),
        ({"q" * 1025: 4}, "rank_pattern keys must be strings of at most 1024 characters"),
    ],
)
def test_pattern_maps_past_their_bounds_are_invalid_argument(
    client: Client, tmp_path: Path, pattern: dict[str, int], expected: str
) -> None:
    peft = _configure(write_peft(tmp_path / "peft"), rank_pattern=pattern)
    code, message = _code(lambda: client.register_adapter("demo", f"keys-{len(pattern)}", peft))
    assert (code, expected in message) == (grpc.StatusCode.INVALID_ARGUMENT, True), message


def _mixed_rank_peft(directory: Path) -> Path:
    """The demo adapter with ``layers.1.mlp.up_proj`` at rank 8, the rest at rank 4."""
    peft = write_peft(directory)
    weights = peft / "adapter_model.safetensors"
    tensors = dict(safetensors.load(weights.read_bytes()))
    rng = np.random.default_rng(3)
    out_features, in_features = demo_weight("layers.1.mlp.up_proj.weight").shape
    prefix = "base_model.model.layers.1.mlp.up_proj"
    tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((8, in_features)).astype(np.float32) * 0.1
    tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_features, 8)).astype(np.float32) * 0.1
    weights.write_bytes(safetensors.dump(tensors))
    return peft


def test_ordinary_patterns_serve_as_peft_reads_them(client: Client, tmp_path: Path, registered: list) -> None:
    """The first matching key wins, ``^`` anchors at the path's start, a key matches whole path
    components only: PEFT's own reading, served exactly."""
    alphas = {
        "^self_attn\\.v_proj": 100.0,
        "^layers\\.1\\.self_attn\\.v_proj": 2.0,
        "_proj": 50.0,
        "q_proj": 6.0,
    }
    ranks = {"mlp\\.up_proj": 8, "up_proj": 2, "p_proj": 16}
    peft = _configure(_mixed_rank_peft(tmp_path / "peft"), rank_pattern=ranks, alpha_pattern=alphas)
    info = client.register_adapter("demo", "patterned", peft)
    registered.append("patterned")
    assert info.rank == 8
    scales = {  # lora_alpha 8 and r 4, but for the patterns
        "layers.0.self_attn.q_proj": 6.0 / 4,
        "layers.1.self_attn.v_proj": 2.0 / 4,
        "layers.1.mlp.up_proj": 8.0 / 8,
    }
    tensors = {
        name.removeprefix("base_model.model.").removesuffix(".weight"): array
        for name, array in safetensors.load((peft / "adapter_model.safetensors").read_bytes()).items()
    }
    merged = {
        f"{m}.weight": demo_weight(f"{m}.weight") + s * (tensors[f"{m}.lora_B"] @ tensors[f"{m}.lora_A"])
        for m, s in scales.items()
    }
    adapted = client.infer("demo", {"input_ids": IDS}, adapter="patterned")["logits"]
    want = merged_reference(None, IDS, merged)
    assert float(np.abs(adapted - want).max() / np.abs(want).max()) <= 1e-4


def test_a_module_the_pattern_gives_another_rank_is_still_refused(client: Client, tmp_path: Path) -> None:
    peft = _configure(write_peft(tmp_path / "peft"), rank_pattern={"^layers\\.0\\..*q_proj$": 8})
    code, message = _code(lambda: client.register_adapter("demo", "wrong-rank", peft))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "module 'layers.0.self_attn.q_proj' has lora_A [4, 128]" in message
    assert "but the config gives it rank 8" in message


# -- tar -------------------------------------------------------------------------------------------


def _header(name: bytes, kind: bytes, size: int) -> bytes:
    """A ustar header block written by hand (tarfile will not write a lying size)."""
    block = bytearray(512)
    block[: len(name)] = name
    block[100:148] = b"0000644\0" + b"0000000\0" * 2 + b"%011o\0" % size + b"00000000000\0"
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _tar_of(directory: Path, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for path in sorted(directory.iterdir()):
            archive.add(path, arcname=f"adapter/{path.name}")
    return buffer.getvalue()


def test_a_gzip_tar_declaring_a_gigabyte_pax_header_is_refused_without_the_memory(
    own_worker: tuple[subprocess.Popen, str], tmp_path: Path
) -> None:
    """A 1 MB upload: a pax header declaring 1 GiB, then 1 GiB of zeros gzip squeezes to
    nothing. tarfile read the whole header into memory before it looked at it; now the header
    is refused from its size field, before a byte of it is read."""
    process, address = own_worker
    zeros = gzip.compress(b"\0" * (1 << 20), compresslevel=9)  # gzip members may follow each other
    bomb = (
        gzip.compress(_header(b"././@PaxHeader", b"x", 1 << 30)) + zeros * 1024 + gzip.compress(b"\0" * 1024)
    )
    assert len(bomb) < 2 << 20
    with Client(address, timeout=60) as client:
        client.infer("demo", {"input_ids": IDS})
        with contextlib.suppress(OSError):  # the peak reset to what the worker holds now (Linux >= 4.0)
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")
        resting = _status_of(process.pid, "VmRSS")
        started = time.monotonic()
        code, message = _code(
            lambda: client.register_adapter("demo", "bomb", _upload(tmp_path, "b.tgz", bomb))
        )
        elapsed = time.monotonic() - started
        peak = _status_of(process.pid, "VmHWM")
    assert peak - resting < 400 << 20, (resting >> 20, peak >> 20)
    assert elapsed < 20, elapsed
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "extended header (type b'x') of 1073741824 bytes, over the 65536-byte limit" in message


@pytest.mark.parametrize(("kind", "name"), [(b"L", b"././@LongLink"), (b"x", b"././@PaxHeader")])
def test_a_long_chain_of_extended_headers_is_invalid_argument(
    client: Client, tmp_path: Path, kind: bytes, name: bytes
) -> None:
    """Each header of a chain made tarfile recurse once more: 2000 of them were INTERNAL."""
    record = b"16 comment=abcd\n" if kind == b"x" else b"adapter/a.json\0"
    link = _header(name, kind, len(record)) + record.ljust(512, b"\0")
    chain = gzip.compress(link * 2000 + _tar_of(write_peft(tmp_path / "peft")))
    code, message = _code(
        lambda: client.register_adapter("demo", f"chain-{kind[0]}", _upload(tmp_path, "c.tgz", chain))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "tar archive has more than 8 extended headers in a row" in message


def test_tars_of_a_peft_adapter_still_register(client: Client, tmp_path: Path, registered: list) -> None:
    """Plain and gzip'd, pax and GNU, with a pax global header (as git archive writes) and long names."""
    peft = write_peft(tmp_path / "peft", seed=5)
    long_dir = tmp_path / ("d" * 150) / ("e" * 150)
    shutil.copytree(peft, long_dir)
    uploads = {
        "plain-pax": _tar_of(peft),
        "gzip-gnu-long": gzip.compress(_tar_of(long_dir, tarfile.GNU_FORMAT)),
        "gzip-pax-long": gzip.compress(_tar_of(long_dir)),
    }
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "0" * 40}
    ) as t:
        t.add(peft, arcname="adapter")
    uploads["gzip-global"] = gzip.compress(buffer.getvalue())
    want = merged_reference(peft, IDS)
    for adapter_id, data in uploads.items():
        client.register_adapter("demo", adapter_id, _upload(tmp_path, f"{adapter_id}.tar", data))
        registered.append(adapter_id)
        adapted = client.infer("demo", {"input_ids": IDS}, adapter=adapter_id)["logits"]
        assert float(np.abs(adapted - want).max() / np.abs(want).max()) <= 1e-4, adapter_id


# -- zip -------------------------------------------------------------------------------------------


def _zip_of(directory: Path, force_zip64: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(directory.iterdir()):
            with archive.open(f"adapter/{path.name}", "w", force_zip64=force_zip64) as member:
                member.write(path.read_bytes())
    return buffer.getvalue()


def _with_end_record(data: bytes, entries: int | None = None, directory_bytes: int | None = None) -> bytes:
    """``data`` with its end-of-central-directory record declaring other figures."""
    end = data.rfind(b"PK\x05\x06")
    record = bytearray(data[end:])
    if entries is not None:
        record[8:12] = struct.pack("<HH", entries, entries)
    if directory_bytes is not None:
        record[12:16] = struct.pack("<I", directory_bytes)
    return data[:end] + bytes(record)


def _as_zip64(data: bytes, entries: int | None = None, directory_bytes: int | None = None) -> bytes:
    """``data`` with a zip64 end record and its locator before the end record, whose own figures
    become the zip64 placeholders, as a writer of a zip64 archive leaves them."""
    end = data.rfind(b"PK\x05\x06")
    record = bytearray(data[end:])
    count, size, offset = struct.unpack("<HII", bytes(record[10:20]))
    count = count if entries is None else entries
    size = size if directory_bytes is None else directory_bytes
    zip64 = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, offset)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, end, 1)
    record[8:20] = struct.pack("<HHII", 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    return data[:end] + zip64 + locator + bytes(record)


def test_a_zip_declaring_too_many_members_is_refused_before_its_directory_is_parsed(
    client: Client, tmp_path: Path
) -> None:
    packed = _zip_of(write_peft(tmp_path / "peft"))
    cases = {
        "end record": _with_end_record(packed, entries=1000),
        "zip64 record": _as_zip64(packed, entries=10**9),
    }
    for case, data in cases.items():
        code, message = _code(
            lambda data=data: client.register_adapter("demo", "z", _upload(tmp_path, "z", data))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, case
        assert "zip archive declares" in message and "members, over the limit of 256" in message, (
            case,
            message,
        )


def test_a_zip_with_a_huge_central_directory_is_refused_whatever_its_count_says(
    client: Client, tmp_path: Path
) -> None:
    """zipfile parses every byte of the directory the end record declares and ignores its count:
    30000 entries declared as 2 were all parsed before the member limit was checked."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(30000):
            archive.writestr(f"m{index}", b"")
    crowded = _with_end_record(buffer.getvalue(), entries=2)
    code, message = _code(lambda: client.register_adapter("demo", "z", _upload(tmp_path, "z", crowded)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "zip archive declares a central directory of" in message
    assert "bytes, over the 1048576-byte limit" in message
    packed = _as_zip64(_zip_of(write_peft(tmp_path / "peft")), directory_bytes=1 << 40)
    code, message = _code(lambda: client.register_adapter("demo", "z", _upload(tmp_path, "z64", packed)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "zip archive declares a central directory of 1099511627776 bytes" in message


def test_zips_of_a_peft_adapter_still_register(client: Client, tmp_path: Path, registered: list) -> None:
    """As zipfile writes them (members with zip64 extras too) and with a zip64 end record."""
    peft = write_peft(tmp_path / "peft", seed=6)
    uploads = {
        "zip": _zip_of(peft),
        "zip-member-zip64": _zip_of(peft, force_zip64=True),
        "zip-zip64-end": _as_zip64(_zip_of(peft)),
    }
    want = merged_reference(peft, IDS)
    for adapter_id, data in uploads.items():
        client.register_adapter("demo", adapter_id, _upload(tmp_path, f"{adapter_id}.zip", data))
        registered.append(adapter_id)
        adapted = client.infer("demo", {"input_ids": IDS}, adapter=adapter_id)["logits"]
        assert float(np.abs(adapted - want).max() / np.abs(want).max()) <= 1e-4, adapter_id
