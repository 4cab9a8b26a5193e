"""The synchronous client, :class:`Client`: models, inference (unary and streamed), adapters,
with affinity routing over one or many pods and failover within one deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from ortmux.client import _convert
from ortmux.client._channel import DEFAULT_MAX_MESSAGE_BYTES, Connections, Stubs
from ortmux.client._errors import OrtmuxError
from ortmux.client._routing import DEFAULT_REFRESH_SECONDS, route_headers
from ortmux.client._streams import StreamBook, handed_out
from ortmux.client._types import AdapterInfo, GenerationChunk, InferRequest, InferResult, ModelInfo
from ortmux.client._uploads import DEFAULT_CHUNK_BYTES, Progress, path_request, upload_requests
from ortmux.v1 import (
    adapters_pb2,
    inference_pb2,
    models_pb2,
)

T = TypeVar("T")


class Client:
    """A blocking client of one ortmux worker, or of several pods with adapter affinity.

    ``target`` is ``host:port``, or several pods: a list of ``host:port`` or a name such as
    ``dns:///ortmux-headless:50051`` (resolved here every ``refresh_seconds``). Over several pods
    each adapter's calls go to one pod (rendezvous hashing), base-only calls to the pods in turn,
    and an idempotent call that finds a pod unavailable to the next. ``timeout`` is the
    default deadline of unary calls in seconds (None: none) and ``stream_timeout`` that of a whole
    ``stream_infer``; every method takes ``timeout=`` to override it. Idempotent calls are retried
    on UNAVAILABLE up to ``retry_attempts`` times in all (uploads and streams never are).
    ``api_key`` is sent with every call (``authorization: Bearer``) to workers with tenants;
    ``credentials`` (``grpc.ssl_channel_credentials``) for TLS and mutual TLS. Safe to share
    between threads. Use as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = 30.0,
        stream_timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry_attempts: int = 3,
        keepalive_seconds: float = 30.0,
        api_key: str | None = None,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
    ) -> None:
        def open_channel(address: str, options: list) -> grpc.Channel:
            if credentials is not None:
                return grpc.secure_channel(address, credentials, options=options)
            return grpc.insecure_channel(address, options=options)

        self._connections = Connections(
            target,
            open_channel,
            max_message_bytes=max_message_bytes,
            retry_attempts=retry_attempts,
            keepalive_seconds=keepalive_seconds,
            refresh_seconds=refresh_seconds,
        )
        self.target = self._connections.target
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every base model the worker serves."""
        response = self._call("models", "ListModels", models_pb2.ListModelsRequest(), timeout)
        return [_convert.model_info(model) for model in response.models]

    def model_info(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        """Inputs, outputs, adapter targets and accounting of one base model."""
        return _convert.model_info(
            self._call("models", "GetModel", models_pb2.GetModelRequest(name=model), timeout)
        )

    def load_model(self, model: str, worker_path: str, *, timeout: float | None = None) -> ModelInfo:
        """Load a base model from an ``.onnx`` file on the worker (admin key); returns once it
        serves. The first load of a model optimizes it, which can take minutes: pass ``timeout``."""
        request = models_pb2.LoadModelRequest(name=model, path=str(worker_path))
        return _convert.model_info(self._call("models", "LoadModel", request, timeout, idempotent=False))

    def unload_model(self, model: str, *, timeout: float | None = None) -> None:
        """Stop serving a base model (admin key); its queued requests still run."""
        self._call(
            "models", "UnloadModel", models_pb2.UnloadModelRequest(name=model), timeout, idempotent=False
        )

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        adapter: str | None = None,
        *,
        output_names: Sequence[str] | None = None,
        priority: int = 0,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``inputs`` (name -> array) through ``model``, optionally with an adapter.
        ``priority``: higher runs first among queued requests of the same tenant (or adapter)."""
        request = _convert.infer_request(model, inputs, adapter, output_names, priority=priority)
        return _convert.infer_outputs(
            self._call("inference", "Infer", request, timeout, route=(model, adapter))
        )

    def stream_infer(
        self,
        requests: Iterable[InferRequest],
        *,
        window: int = 64,
        ordered: bool = False,
        raise_errors: bool = False,
        timeout: float | None = None,
        route: tuple[str, str] | None = None,
    ) -> Iterator[InferResult]:
        """Send ``requests`` over one stream and yield an :class:`InferResult` for each.

        At most ``window`` requests are in flight (``requests`` is read lazily, so it may be
        endless). Results come as they complete, or in input order when ``ordered``. A request's
        error is yielded as its result's ``error`` unless ``raise_errors``. Stopping the iteration
        cancels the stream and the worker drops its queued requests. Over several pods a stream
        goes to the pods in turn, or to the pod of ``route`` = (model, adapter).
        """
        if window < 1:
            raise ValueError("window must be at least 1")
        book = StreamBook(ordered)
        slots = threading.Semaphore(window)
        stopped = threading.Event()
        failures: list[BaseException] = []

        def outgoing() -> Iterator[inference_pb2.InferRequest]:
            try:
                for request in requests:
                    message = book.encode(request)
                    if message is None:
                        continue
                    slots.acquire()
                    if stopped.is_set():
                        return
                    yield message
            except Exception as exc:  # re-raised to the caller once the stream has ended
                failures.append(exc)

        call = self._stream_stubs(route).inference.InferStream(
            outgoing(),
            timeout=self.stream_timeout if timeout is None else timeout,
            metadata=self._metadata + route_headers(route),
        )
        try:
            for message in call:
                results, freed = book.answer(message)
                if freed:
                    slots.release(freed)
                yield from handed_out(results, raise_errors)
            yield from handed_out(book.flush(), raise_errors)
        except grpc.RpcError as error:
            raise OrtmuxError.from_rpc_error(error) from None
        finally:
            stopped.set()
            slots.release(window)
            call.cancel()
        if failures:
            raise failures[0]

    def generate(
        self,
        model: str,
        *,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        adapter: str = "",
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        timeout: float | None = None,
        stop_token_ids: Sequence[int] = (),
        priority: int = 0,
        request_id: str = "",
    ) -> Iterator[GenerationChunk]:
        """Generate with a decoder: an iterator of :class:`GenerationChunk` as tokens come.

        Exactly one of ``prompt`` (text, encoded by the model's tokenizer with its special tokens)
        or ``input_ids``. ``temperature`` 0 is greedy; ``seed`` makes sampling reproducible;
        ``stop`` strings end it (not returned). ``timeout`` bounds the whole generation
        (DEADLINE_EXCEEDED after the chunks already given). Closing the iterator cancels it.
        """
        request = _convert.generate_request(
            model,
            prompt,
            input_ids,
            adapter,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            stop_token_ids,
            priority,
            request_id,
        )
        route = (model, adapter or None)
        call = self._stream_stubs(route).inference.Generate(
            request,
            timeout=self.stream_timeout if timeout is None else timeout,
            metadata=self._metadata + route_headers(route),
        )
        try:
            for message in call:
                yield _convert.generation_chunk(message)
        except grpc.RpcError as error:
            raise OrtmuxError.from_rpc_error(error) from None
        finally:
            call.cancel()

    def infer_batch(
        self,
        model: str,
        inputs: Iterable[Mapping[str, np.ndarray]],
        adapter: str | None = None,
        *,
        output_names: Sequence[str] | None = None,
        window: int = 64,
        timeout: float | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Outputs for each of ``inputs``, in order, sent over one stream; raises the first error."""
        requests = (InferRequest(model, item, adapter=adapter, output_names=output_names) for item in inputs)
        results = self.stream_infer(
            requests,
            window=window,
            ordered=True,
            raise_errors=True,
            timeout=timeout,
            route=(model, adapter) if adapter else None,
        )
        return [result.unwrap() for result in results]

    def register_adapter(
        self,
        model: str,
        adapter_id: str,
        path_or_dir: str | Path,
        *,
        format: str | None = None,
        pinned: bool = False,
        replace: bool = False,
        module_mapping: Mapping[str, str] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> AdapterInfo:
        """Upload an adapter: a PEFT directory (adapter_config.json + adapter_model.safetensors),
        an archive of one, an .onnx_adapter, or a .safetensors/.npz of replacement weights.

        ``format`` ("peft_lora", "ort_adapter", "weight_override") skips detection;
        ``progress(sent_bytes, total_bytes)`` is called after every chunk. Never retried.
        """
        requests = upload_requests(
            model,
            adapter_id,
            path_or_dir,
            format=format,
            pinned=pinned,
            replace=replace,
            module_mapping=module_mapping,
            chunk_bytes=chunk_bytes,
            progress=progress,
        )
        return _convert.adapter_info(
            self._call(
                "adapters", "RegisterAdapter", requests, timeout, route=(model, adapter_id), idempotent=False
            )
        )

    def register_adapter_from_path(
        self,
        model: str,
        adapter_id: str,
        worker_path: str,
        *,
        format: str | None = None,
        pinned: bool = False,
        replace: bool = False,
        module_mapping: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> AdapterInfo:
        """Register an adapter already on the worker's filesystem (an operator's shortcut: no
        upload; the worker copies it into its store). Same formats as ``register_adapter``."""
        request = path_request(
            model,
            adapter_id,
            worker_path,
            format=format,
            pinned=pinned,
            replace=replace,
            module_mapping=module_mapping,
        )
        return _convert.adapter_info(
            self._call(
                "adapters",
                "RegisterAdapterFromPath",
                request,
                timeout,
                route=(model, adapter_id),
                idempotent=False,
            )
        )

    def get_adapter(self, model: str, adapter_id: str, *, timeout: float | None = None) -> AdapterInfo:
        request = adapters_pb2.GetAdapterRequest(model=model, adapter_id=adapter_id)
        return _convert.adapter_info(
            self._call("adapters", "GetAdapter", request, timeout, route=(model, adapter_id))
        )

    def list_adapters(self, model: str | None = None, *, timeout: float | None = None) -> list[AdapterInfo]:
        """Every adapter of ``model`` (all models when None), across pages."""
        adapters: list[AdapterInfo] = []
        token = ""
        while True:
            request = adapters_pb2.ListAdaptersRequest(model=model or "", page_token=token)
            response = self._call("adapters", "ListAdapters", request, timeout)
            adapters += [_convert.adapter_info(info) for info in response.adapters]
            token = response.next_page_token
            if not token:
                return adapters

    def delete_adapter(self, model: str, adapter_id: str, *, timeout: float | None = None) -> None:
        """Delete an adapter; requests already running on it finish first."""
        request = adapters_pb2.DeleteAdapterRequest(model=model, adapter_id=adapter_id)
        self._call("adapters", "DeleteAdapter", request, timeout, route=(model, adapter_id), idempotent=False)

    def close(self) -> None:
        for channel in self._connections.channels():
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _addresses(self, route: tuple[str, str | None] | None, idempotent: bool) -> list[str | None]:
        connections = self._connections
        if connections.refresh_due():
            for channel in connections.refresh():
                channel.close()
        return connections.order(route, idempotent)

    def _stream_stubs(self, route: tuple[str, str] | None) -> Stubs:
        return self._connections.stubs(self._addresses(route, idempotent=False)[0])

    def _call(
        self,
        service: str,
        method: str,
        request: Any,
        timeout: float | None,
        *,
        route: tuple[str, str | None] | None = None,
        idempotent: bool = True,
    ) -> Any:
        """One call, to the pod its route ranks first; an idempotent call that finds a pod
        unavailable goes on to the next, within the one deadline."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        metadata = self._metadata + route_headers(route)
        addresses = self._addresses(route, idempotent)
        for attempt, address in enumerate(addresses, start=1):
            stub = getattr(self._connections.stubs(address), service)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                result = getattr(stub, method)(request, timeout=left, metadata=metadata)
            except grpc.RpcError as rpc_error:
                error = OrtmuxError.from_rpc_error(rpc_error)
                if self._connections.failed(address, error) and attempt < len(addresses):
                    continue
                raise error from None
            self._connections.answered(address)
            return result
        raise AssertionError("no address to call")
