"""Receiving an adapter: an upload's stream, or files on the worker, checked against their declared
size and checksum while they are written to a staging directory."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from ortmux.worker.adapters.formats import Payload
from ortmux.worker.adapters.local_store import DEFAULT_TENANT, AdapterStore, PendingAdapter
from ortmux.worker.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

SHA256 = re.compile(r"^[0-9a-f]{64}$")


class UploadLimits(Protocol):
    max_adapter_bytes: int
    max_upload_chunks: int


@dataclasses.dataclass(frozen=True)
class UploadHeader:
    model: str
    adapter_id: str
    format: str = ""  # "" detects the format
    total_bytes: int = 0
    sha256: str = ""
    files: tuple[tuple[str, int], ...] = ()  # named files back to back; () = one file or archive
    pinned: bool = False
    replace: bool = False
    module_mapping_json: str = ""
    tenant: str = DEFAULT_TENANT


@dataclasses.dataclass(frozen=True)
class UploadTrailer:
    """The optional last part of an upload: its checksum, computed while sending."""

    sha256: str


def receive_upload(
    store: AdapterStore, limits: UploadLimits, header: UploadHeader, parts: Iterable[bytes | UploadTrailer]
) -> tuple[UploadHeader, Payload, PendingAdapter]:
    """The payload of an upload, checked against its size and checksum, and written to a
    staging directory as it arrives; returns the header with the verified sha256 filled in.

    The checksum comes in the header or in a trailer after the last chunk (so a client can
    hash while sending). Refuses an upload as soon as it passes its declared or allowed size,
    so neither memory nor disk ever holds more than ``max_adapter_bytes`` of it.
    """
    limit = limits.max_adapter_bytes
    if header.total_bytes <= 0:
        raise InvalidArgument("header.total_bytes must be positive", field="header.total_bytes")
    if header.total_bytes > limit:
        raise ResourceExhausted(
            f"adapter of {header.total_bytes} bytes exceeds the limit of {limit} bytes",
            field="header.total_bytes",
        )
    if header.sha256 and not SHA256.match(header.sha256):
        raise InvalidArgument("header.sha256 must be 64 lower-case hex digits", field="header.sha256")
    check_file_list(header.files, header.total_bytes)
    digest = hashlib.sha256()
    received = 0
    trailer: UploadTrailer | None = None
    pending = store.begin(header.total_bytes)
    try:
        for count, part in enumerate(parts, start=1):
            if trailer is not None:
                raise InvalidArgument("the trailer must be the last message of an upload", field="trailer")
            if isinstance(part, UploadTrailer):
                if not SHA256.match(part.sha256):
                    raise InvalidArgument(
                        "trailer.sha256 must be 64 lower-case hex digits", field="trailer.sha256"
                    )
                trailer = part
                continue
            if count > limits.max_upload_chunks:
                raise ResourceExhausted(
                    f"upload has more than {limits.max_upload_chunks} chunks", field="chunk"
                )
            received += len(part)
            if received > header.total_bytes:
                raise InvalidArgument(
                    f"upload sent more than the {header.total_bytes} bytes its header declares",
                    field="chunk",
                )
            digest.update(part)
            pending.write(part)
        if received != header.total_bytes:
            raise InvalidArgument(
                f"upload ended after {received} of {header.total_bytes} bytes", field="chunk"
            )
        declared = [
            (field, value)
            for field, value in (
                ("header.sha256", header.sha256),
                ("trailer.sha256", trailer and trailer.sha256),
            )
            if value
        ]
        if not declared:
            raise InvalidArgument(
                "the upload carries no sha256: set header.sha256 or end with a trailer",
                field="header.sha256",
            )
        for field, value in declared:
            if value != digest.hexdigest():
                raise InvalidArgument(
                    f"checksum mismatch: {field} is {value}, the payload hashes to {digest.hexdigest()}",
                    field=field,
                )
        payload = pending.finish()
    except BaseException:
        pending.abort()
        raise
    return dataclasses.replace(header, sha256=digest.hexdigest()), payload, pending


def receive_path(
    store: AdapterStore,
    limits: UploadLimits,
    header: UploadHeader,
    path: Path,
    readable: Callable[[Path], Path] = Path.resolve,
) -> tuple[UploadHeader, Payload, PendingAdapter]:
    """An adapter from a file, archive or directory on the worker's filesystem, copied into a
    staging directory; returns the header with its files and sha256 filled in. Every file is read
    where ``readable`` resolves it (a symlink to a file outside the allowed paths is refused)."""
    if not path.exists():
        raise NotFound(f"no file or directory at {path}", field="path")
    listed = (
        sorted(p for p in path.iterdir() if p.is_file() and p.name != "README.md")
        if path.is_dir()
        else [path]
    )
    names, sources = [p.name for p in listed], [readable(p) for p in listed]
    size = sum(p.stat().st_size for p in sources)
    if size > limits.max_adapter_bytes:
        raise ResourceExhausted(f"{path} exceeds the limit of {limits.max_adapter_bytes} bytes", field="path")
    if path.is_dir():
        header = dataclasses.replace(
            header, files=tuple((name, p.stat().st_size) for name, p in zip(names, sources, strict=True))
        )
    digest = hashlib.sha256()
    block = memoryview(bytearray(1 << 20))  # one reused buffer: no fresh pages to fault in
    pending = store.begin(size)
    changed = FailedPrecondition(f"{path} changed while it was being read", field="path")
    try:
        copied = 0
        for source in sources:
            with source.open("rb") as handle:
                while count := handle.readinto(block):
                    copied += count
                    if copied > size:
                        raise changed
                    digest.update(block[:count])
                    pending.write(block[:count])
        if copied != size:
            raise changed
        payload = pending.finish()
    except BaseException:
        pending.abort()
        raise
    return dataclasses.replace(header, sha256=digest.hexdigest()), payload, pending


def check_file_list(files: tuple[tuple[str, int], ...], total: int) -> None:
    for name, _size in files:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise InvalidArgument(f"file name {name!r} is invalid", field="header.files")
    if files and sum(size for _name, size in files) != total:
        raise InvalidArgument("the sizes in header.files do not add up to total_bytes", field="header.files")
