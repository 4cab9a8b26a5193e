"""Files the worker writes, always atomically (temp file, fsync, rename, fsync of the directory),
and the TOML files it reads."""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from ortmux.worker.errors import InvalidArgument


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or create inside ``directory`` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_toml(path: Path, what: str, field: str) -> dict[str, Any]:
    """A TOML document, or InvalidArgument naming ``what`` it is and the setting that points to it."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise InvalidArgument(f"{what} {path}: {exc.strerror}", field=field) from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{what} {path} is not valid TOML: {exc}", field=field) from None
