"""An object store behind one small interface: what the shared adapter store needs of S3.

:class:`S3Objects` talks to AWS S3 and S3-compatible stores (MinIO, Ceph RGW, GCS interop, rclone)
through boto3, configured the standard AWS way: ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, web identity (IRSA) and every
other source of boto3's credential chain. Checksums are sent only where a request requires them:
boto3 >= 1.36 adds CRC checksums by default, which several S3-compatible stores reject.

A failure to reach the store, or an answer that is neither the object nor "not there", raises
:class:`StoreUnavailable`, which callers answer as UNAVAILABLE: an outage never reads as "no such
adapter".
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

READ_CHUNK_BYTES = 1 << 20


class StoreUnavailable(Exception):
    """The object store could not be reached or refused the request. ``str()`` is the whole story
    for the worker's log (the store's address, the key, the client library's words); ``public``
    is what a caller is told: the operation and the kind of failure, nothing of where the store
    is or how it is laid out."""

    def __init__(self, detail: str, public: str = "") -> None:
        super().__init__(detail)
        self.public = public or "the adapter store failed to answer"


class Conflict(Exception):
    """A conditional write found the key taken (``If-None-Match: *``)."""


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch
    etag: str


@dataclasses.dataclass
class OperationCounts:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0


class StoreCounters:
    """Requests, errors and seconds by operation (get, put, list, delete, head) and bytes moved."""

    def __init__(self) -> None:
        self.operations: collections.defaultdict[str, OperationCounts] = collections.defaultdict(
            OperationCounts
        )
        self.bytes_received = 0
        self.bytes_sent = 0
        self.lock = threading.Lock()

    def snapshot(self) -> tuple[dict[str, OperationCounts], int, int]:
        with self.lock:
            operations = {name: dataclasses.replace(counts) for name, counts in self.operations.items()}
            return operations, self.bytes_received, self.bytes_sent


class Objects(Protocol):
    """Keys under one prefix of one bucket. Objects are written whole or not at all."""

    counters: StoreCounters
    description: str

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None: ...

    def put_file(self, key: str, path: Path) -> None: ...

    def get(self, key: str) -> tuple[bytes, str] | None:
        """The object and its ETag; None when there is none."""
        ...

    def read_into(self, key: str, sink: Callable[[bytes], None]) -> int | None:
        """Stream an object into ``sink`` chunk by chunk; its size, or None when there is none."""
        ...

    def list(self, prefix: str, start_after: str = "") -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...


def parse_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix without slashes at its ends)."""
    if not url.startswith("s3://"):
        raise ValueError(f"adapter store '{url}' is not s3://BUCKET/PREFIX")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"adapter store '{url}' names no bucket")
    return bucket, prefix.strip("/")


class _Missing(Exception):
    pass


class S3Objects:
    """:class:`Objects` on an S3 bucket through boto3 (one client, safe to share between threads)."""

    def __init__(self, url: str, *, timeout_seconds: float = 10.0, attempts: int = 3) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = parse_url(url)
        self.description = url
        self.counters = StoreCounters()
        config = Config(
            connect_timeout=timeout_seconds,
            read_timeout=timeout_seconds,
            retries={"max_attempts": attempts, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
            max_pool_connections=32,
        )
        self._client = boto3.session.Session().client("s3", config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(
        self, operation: str, what: str, function: Callable[..., Any], *, counted: bool = True, **kwargs: Any
    ) -> Any:
        """``function(**kwargs)`` with its errors translated; ``counted`` False for the reads of a
        response body, which belong to the request that opened it."""
        from botocore.exceptions import BotoCoreError, ClientError

        started = time.perf_counter()
        failed = True
        try:
            result = function(**kwargs)
            failed = False
            return result
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = error.get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                failed = False
                raise _Missing() from None
            if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                failed = False
                raise Conflict(what) from None
            raise StoreUnavailable(
                f"adapter store {self.description}: {what} failed: {code or status} "
                f"{error.get('Message', '')}".rstrip(),
                f"the adapter store refused a {operation} ({code or status})",
            ) from None
        except BotoCoreError as exc:
            raise StoreUnavailable(
                f"adapter store {self.description}: {what} failed: {exc}",
                f"the adapter store did not answer a {operation} ({type(exc).__name__})",
            ) from None
        finally:
            with self.counters.lock:
                counts = self.counters.operations[operation]
                counts.requests += counted
                counts.errors += failed
                counts.seconds += time.perf_counter() - started

    def _moved(self, received: int = 0, sent: int = 0) -> None:
        with self.counters.lock:
            self.counters.bytes_received += received
            self.counters.bytes_sent += sent

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self._put(key, data, len(data), {"IfNoneMatch": "*"} if if_absent else {})

    def put_file(self, key: str, path: Path) -> None:
        with path.open("rb") as handle:
            self._put(key, handle, path.stat().st_size, {})

    def _put(self, key: str, body: Any, size: int, extra: dict[str, str]) -> None:
        self._call(
            "put",
            f"writing {key}",
            self._client.put_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=body,
            ContentLength=size,
            **extra,
        )
        self._moved(sent=size)

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            response = self._call(
                "get", f"reading {key}", self._client.get_object, Bucket=self.bucket, Key=self._key(key)
            )
            data = self._call("get", f"reading {key}", response["Body"].read, counted=False)
        except _Missing:
            return None
        self._moved(received=len(data))
        return data, response.get("ETag", "")

    def read_into(self, key: str, sink: Callable[[bytes], None]) -> int | None:
        try:
            response = self._call(
                "get", f"reading {key}", self._client.get_object, Bucket=self.bucket, Key=self._key(key)
            )
        except _Missing:
            return None
        body, total = response["Body"], 0
        try:
            while True:
                chunk = self._call("get", f"reading {key}", body.read, counted=False, amt=READ_CHUNK_BYTES)
                if not chunk:
                    break
                sink(chunk)
                total += len(chunk)
        finally:
            body.close()
            self._moved(received=total)
        return total

    def list(self, prefix: str, start_after: str = "") -> Iterator[ObjectInfo]:
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key(prefix)}
        if start_after:
            arguments["StartAfter"] = self._key(start_after)
        strip = len(self._key(""))
        while True:
            page = self._call("list", f"listing {prefix}", self._client.list_objects_v2, **arguments)
            for item in page.get("Contents", []):
                yield ObjectInfo(
                    item["Key"][strip:],
                    int(item["Size"]),
                    item["LastModified"].timestamp(),
                    item.get("ETag", ""),
                )
            if not page.get("IsTruncated"):
                return
            arguments["ContinuationToken"] = page["NextContinuationToken"]

    def delete(self, key: str) -> None:
        with contextlib.suppress(_Missing):
            self._call(
                "delete",
                f"deleting {key}",
                self._client.delete_object,
                Bucket=self.bucket,
                Key=self._key(key),
            )
