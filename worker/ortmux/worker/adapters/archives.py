"""Archive uploads (zip, tar, gzip'd tar) -> their files, with every bound checked before it is spent.

A zip's member count and central directory size are read from its end record before zipfile parses
the directory; a tar is read as a stream whose decompressed bytes, header blocks and extended
headers (GNU long names, pax) are counted and bounded as they come.
"""

from __future__ import annotations

import gzip
import io
import mmap
import tarfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

from ortmux.worker.errors import InvalidArgument

# An upload as received: bytes, or the memory it was gathered in (see store.PendingAdapter).
Payload = bytes | mmap.mmap

MAX_ARCHIVE_MEMBERS = 256
# zipfile parses exactly the central directory size the end record declares, whatever its count.
MAX_CENTRAL_DIRECTORY_BYTES = 1 << 20
# Every tar header block, a member's own and its extended ones, counts against this.
MAX_TAR_HEADERS = 4 * MAX_ARCHIVE_MEMBERS
MAX_EXTENDED_HEADER_BYTES = 64 << 10  # one GNU long name/link or pax header
MAX_EXTENDED_TOTAL_BYTES = 1 << 20  # all of an archive's extended headers together
MAX_GLOBAL_HEADER_BYTES = 16 << 10  # pax global headers: tarfile copies them into every member
MAX_HEADER_CHAIN = 8  # extended headers in a row before a member (tarfile recurses through them)
# What a tar stream holds besides its members' bytes: each header block and the padding of its data,
# the extended headers, and the end-of-archive record.
TAR_HEADER_SLACK = MAX_TAR_HEADERS * 2 * tarfile.BLOCKSIZE + MAX_EXTENDED_TOTAL_BYTES + tarfile.RECORDSIZE

_EOCD = b"PK\x05\x06"
_EOCD_BYTES = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_LOCATOR_BYTES = 20
_ZIP64_EOCD = b"PK\x06\x06"
_ZIP64_EOCD_BYTES = 56
_EXTENDED_TYPES = frozenset(
    {
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    }
)


def unpack(
    payload: Payload, files: Mapping[str, bytes | memoryview] | None, max_bytes: int
) -> dict[str, Payload]:
    """The files of an upload: named files as given, or a single file/archive opened here."""
    if files:
        return {Path(name).name: data for name, data in files.items()}  # type: ignore[misc]
    if payload[:4] == b"PK\x03\x04":
        return _unzip(payload, max_bytes)
    if payload[:2] == b"\x1f\x8b" or _looks_like_tar(payload):
        return _untar(payload, max_bytes)
    return {"": payload}


def _looks_like_tar(payload: Payload) -> bool:
    return len(payload) > 262 and payload[257:262] == b"ustar"


def _too_many_members() -> InvalidArgument:
    return InvalidArgument(f"archive has more than {MAX_ARCHIVE_MEMBERS} members")


# -- zip -------------------------------------------------------------------------------------------


def check_zip_directory(payload: Payload) -> None:
    """InvalidArgument when a zip's end records declare more than MAX_ARCHIVE_MEMBERS members or a
    central directory over MAX_CENTRAL_DIRECTORY_BYTES; read before zipfile parses the directory.

    The end record is found where zipfile looks for it (the last 22 bytes, else the last signature
    in the final 64 KiB + 22). Every figure a reader may take is checked: the record's own (but for
    the zip64 placeholders when a zip64 record stands in for them) and those of a zip64 record, both
    at the offset its locator gives and just before the locator (where zipfile reads it).
    """
    end = _end_record(payload)
    if end is None:
        return  # not a zip zipfile can open: it says so itself
    entries = _uint(payload, end + 10, 2)
    size = _uint(payload, end + 12, 4)
    declared: list[tuple[int, int]] = []
    locator = end - _ZIP64_LOCATOR_BYTES
    if locator >= 0 and payload[locator : locator + 4] == _ZIP64_LOCATOR:
        for start in dict.fromkeys((_uint(payload, locator + 8, 8), locator - _ZIP64_EOCD_BYTES)):
            if 0 <= start <= len(payload) - _ZIP64_EOCD_BYTES and payload[start : start + 4] == _ZIP64_EOCD:
                declared.append((_uint(payload, start + 32, 8), _uint(payload, start + 40, 8)))
    if declared:  # the 16/32-bit fields at their maximum only say "see the zip64 record"
        entries = 0 if entries == 0xFFFF else entries
        size = 0 if size == 0xFFFFFFFF else size
    declared.append((entries, size))
    for entries, size in declared:
        if entries > MAX_ARCHIVE_MEMBERS:
            raise InvalidArgument(
                f"zip archive declares {entries} members, over the limit of {MAX_ARCHIVE_MEMBERS}"
            )
        if size > MAX_CENTRAL_DIRECTORY_BYTES:
            raise InvalidArgument(
                f"zip archive declares a central directory of {size} bytes, over the "
                f"{MAX_CENTRAL_DIRECTORY_BYTES}-byte limit"
            )


def _end_record(payload: Payload) -> int | None:
    """Where the end-of-central-directory record starts, found as zipfile finds it."""
    length = len(payload)
    last = length - _EOCD_BYTES
    if last >= 0 and payload[last : last + 4] == _EOCD and payload[length - 2 : length] == b"\0\0":
        return last  # no archive comment
    start = max(length - (1 << 16) - _EOCD_BYTES, 0)
    found = payload[start:].rfind(_EOCD)
    if found < 0 or length - (start + found) < _EOCD_BYTES:
        return None
    return start + found


def _uint(payload: Payload, offset: int, size: int) -> int:
    return int.from_bytes(payload[offset : offset + size], "little")


def _unzip(payload: Payload, max_bytes: int) -> dict[str, Payload]:
    check_zip_directory(payload)
    # A member never expands past the size its header declares (zipfile stops there), so the
    # declared total bounds what unpacking can produce.
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
            if len(members) > MAX_ARCHIVE_MEMBERS:
                raise _too_many_members()
            total = sum(info.file_size for info in members)
            if total > max_bytes:
                raise InvalidArgument(f"archive expands to {total} bytes, over the {max_bytes}-byte limit")
            names = [info.filename for info in members]
            if names and all(name.endswith(".npy") for name in names):
                return {"": payload}  # an .npz of named tensors, not an archive of files
            return {Path(info.filename).name: _read_member(archive.open(info), max_bytes) for info in members}
    except zipfile.BadZipFile as exc:
        raise InvalidArgument(f"upload is not a valid zip archive: {exc}") from None


# -- tar -------------------------------------------------------------------------------------------


class _CountingReader:
    """Reads ``source`` and refuses, as InvalidArgument, to hand out more than ``limit`` bytes."""

    def __init__(self, source: io.BufferedIOBase, limit: int, max_bytes: int) -> None:
        self._source = source
        self._limit = limit
        self._max_bytes = max_bytes
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(self._limit + 1 - self.total if size < 0 else size)
        self.total += len(data)
        if self.total > self._limit:
            raise InvalidArgument(
                f"the tar archive expands past {self._limit} bytes (the {self._max_bytes}-byte limit "
                f"plus {TAR_HEADER_SLACK} bytes for headers)"
            )
        return data


def _shown(name: str) -> str:
    return name if len(name) <= 200 else f"{name[:200]}..."


def _sparse(name: str) -> InvalidArgument:
    return InvalidArgument(f"tar member '{_shown(name)}' is a sparse file; sparse members are not accepted")


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header that counts itself and refuses, before tarfile reads them, oversized extended
    headers (tarfile reads one whole into memory), long chains of them (it recurses through a
    chain) and sparse members (their maps grow with the data)."""

    def _proc_member(self, archive: _BoundedTarFile) -> tarfile.TarInfo | None:  # type: ignore[override]
        archive.headers += 1
        if archive.headers > MAX_TAR_HEADERS:
            raise InvalidArgument(f"tar archive has more than {MAX_TAR_HEADERS} header blocks")
        if self.size < 0:
            raise InvalidArgument(
                f"tar header of '{_shown(self.name)}' declares a negative size ({self.size})"
            )
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _sparse(self.name)
        if self.type not in _EXTENDED_TYPES:
            return super()._proc_member(archive)
        if self.size > MAX_EXTENDED_HEADER_BYTES:
            raise InvalidArgument(
                f"tar archive has an extended header (type {self.type!r}) of {self.size} bytes, over the "
                f"{MAX_EXTENDED_HEADER_BYTES}-byte limit"
            )
        archive.extended_bytes += self.size
        if archive.extended_bytes > MAX_EXTENDED_TOTAL_BYTES:
            raise InvalidArgument(
                f"tar archive's extended headers hold more than {MAX_EXTENDED_TOTAL_BYTES} bytes in all"
            )
        if self.type == tarfile.XGLTYPE:
            archive.global_bytes += self.size
            if archive.global_bytes > MAX_GLOBAL_HEADER_BYTES:
                raise InvalidArgument(
                    f"tar archive's pax global headers hold more than {MAX_GLOBAL_HEADER_BYTES} bytes"
                )
        archive.chain += 1
        if archive.chain > MAX_HEADER_CHAIN:
            raise InvalidArgument(f"tar archive has more than {MAX_HEADER_CHAIN} extended headers in a row")
        try:
            return super()._proc_member(archive)
        finally:
            archive.chain -= 1

    def _refuse_sparse(self, member: tarfile.TarInfo, *_: object) -> None:
        raise _sparse(member.name)

    # pax's GNU sparse formats 0.0, 0.1 and 1.0 (1.0 reads its map from the member's data).
    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse  # type: ignore[assignment]


class _BoundedTarFile(tarfile.TarFile):
    """A TarFile reading _BoundedTarInfo headers, with their counts."""

    tarinfo = _BoundedTarInfo
    headers = 0
    extended_bytes = 0
    global_bytes = 0
    chain = 0


def _untar(payload: Payload, max_bytes: int) -> dict[str, Payload]:
    source: io.BufferedIOBase = io.BytesIO(payload)
    if payload[:2] == b"\x1f\x8b":
        source = gzip.GzipFile(fileobj=source)
    stream = _CountingReader(source, max_bytes + TAR_HEADER_SLACK, max_bytes)
    try:
        with _BoundedTarFile.open(fileobj=stream, mode="r|") as archive:  # type: ignore[arg-type]
            out: dict[str, Payload] = {}
            total = 0
            for count, member in enumerate(archive, start=1):
                if count > MAX_ARCHIVE_MEMBERS:
                    raise _too_many_members()
                if not member.isfile():
                    continue
                total += member.size
                if total > max_bytes:
                    raise InvalidArgument(f"archive expands past the {max_bytes}-byte limit")
                handle = archive.extractfile(member)
                if handle is not None:
                    out[Path(member.name).name] = _read_member(handle, max_bytes)
            return out
    except RecursionError:
        raise InvalidArgument("upload is not a valid tar archive: its headers nest too deeply") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError, IndexError) as exc:
        raise InvalidArgument(f"upload is not a valid tar archive: {exc}") from None


def _read_member(handle: io.BufferedIOBase, max_bytes: int) -> bytes:
    data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InvalidArgument(f"an archive member expands past the {max_bytes}-byte limit")
    return data
