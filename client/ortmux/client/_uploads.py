"""Adapter uploads: files on disk -> a header and a stream of chunks (shared by both clients)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ortmux.v1 import adapters_pb2

DEFAULT_CHUNK_BYTES = 1 << 20

FORMATS = {
    None: adapters_pb2.ADAPTER_FORMAT_UNSPECIFIED,
    "peft_lora": adapters_pb2.ADAPTER_FORMAT_PEFT_LORA,
    "ort_adapter": adapters_pb2.ADAPTER_FORMAT_ORT_ADAPTER,
    "weight_override": adapters_pb2.ADAPTER_FORMAT_WEIGHT_OVERRIDE,
}

Progress = Callable[[int, int], None]


def upload_files(path: str | Path) -> list[Path]:
    """What an upload of ``path`` sends: the file itself, or a directory's regular files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name != "README.md")
        if not files:
            raise ValueError(f"{path} holds no files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"no file or directory at {path}")
    return [path]


def upload_requests(
    model: str,
    adapter_id: str,
    path: str | Path,
    *,
    format: str | None = None,
    pinned: bool = False,
    replace: bool = False,
    module_mapping: Mapping[str, str] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Progress | None = None,
) -> Iterator[adapters_pb2.RegisterAdapterRequest]:
    """The header message, the files' bytes in chunks (read lazily), then the checksum."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(f for f in FORMATS if f)} or None, got {format!r}")
    files = upload_files(path)
    sizes = [file.stat().st_size for file in files]
    total = sum(sizes)
    header = adapters_pb2.AdapterUploadHeader(
        model=model,
        adapter_id=adapter_id,
        format=FORMATS[format],
        total_bytes=total,
        pinned=pinned,
        replace=replace,
        module_mapping_json=json.dumps(dict(module_mapping)) if module_mapping else "",
    )
    if len(files) > 1 or Path(path).is_dir():
        header.files.extend(
            adapters_pb2.UploadFile(name=f.name, size_bytes=s) for f, s in zip(files, sizes, strict=True)
        )

    def requests() -> Iterator[adapters_pb2.RegisterAdapterRequest]:
        # One pass over the files: hash each block as it goes out; the checksum follows the last one.
        yield adapters_pb2.RegisterAdapterRequest(header=header)
        digest = hashlib.sha256()
        sent = 0
        for file in files:
            for block in _blocks(file, chunk_bytes):
                digest.update(block)
                sent += len(block)
                yield adapters_pb2.RegisterAdapterRequest(chunk=block)
                if progress is not None:
                    progress(sent, total)
        yield adapters_pb2.RegisterAdapterRequest(
            trailer=adapters_pb2.AdapterUploadTrailer(sha256=digest.hexdigest())
        )

    return requests()


def _blocks(file: Path, chunk_bytes: int) -> Iterator[bytes]:
    with file.open("rb") as handle:
        yield from iter(lambda: handle.read(chunk_bytes), b"")


def path_request(
    model: str,
    adapter_id: str,
    worker_path: str,
    *,
    format: str | None = None,
    pinned: bool = False,
    replace: bool = False,
    module_mapping: Mapping[str, str] | None = None,
) -> adapters_pb2.RegisterAdapterFromPathRequest:
    """A registration of an adapter that already lies on the worker's filesystem."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(f for f in FORMATS if f)} or None, got {format!r}")
    return adapters_pb2.RegisterAdapterFromPathRequest(
        model=model,
        adapter_id=adapter_id,
        format=FORMATS[format],
        path=str(worker_path),
        pinned=pinned,
        replace=replace,
        module_mapping_json=json.dumps(dict(module_mapping)) if module_mapping else "",
    )
