from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from ortmux.client import _convert
from ortmux.client._channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options, channel_target
from ortmux.client._errors import OrtmuxError
from ortmux.client._streams import StreamBook, handed_out
from ortmux.client._types import AdapterInfo, InferRequest, InferResult, ModelInfo
from ortmux.client._uploads import DEFAULT_CHUNK_BYTES, Progress, path_request, upload_requests
from ortmux.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

T = TypeVar("T")


class Client:
    """A blocking client of one ortmux worker, or of several with round-robin balancing.

    ``target`` is ``host:port``, a gRPC name such as ``dns:///ortmux-headless:50051`` (every
    address it resolves to gets calls in turn), or a list of ``host:port``. ``timeout`` is the
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
    ) -> None:
        options = channel_options(
            max_message_bytes, retry_attempts=retry_attempts, keepalive_seconds=keepalive_seconds
        )
        address = channel_target(target)
        self._channel = (
            grpc.secure_channel(address, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(address, options=options)
        )
        self.target = address
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)
        self._inference = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdapterServiceStub(self._channel)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every base model the worker serves."""
        response = self._call(self._models.ListModels, models_pb2.ListModelsRequest(), timeout)
        return [_convert.model_info(model) for model in response.models]

    def model_info(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        """Inputs, outputs, adapter targets and accounting of one base model."""
        return _convert.model_info(
            self._call(self._models.GetModel, models_pb2.GetModelRequest(name=model), timeout)
        )

    def load_model(self, model: str, worker_path: str, *, timeout: float | None = None) -> ModelInfo:
        """Load a base model from an ``.onnx`` file on the worker (admin key); returns once it
        serves. The first load of a model optimizes it, which can take minutes: pass ``timeout``."""
        request = models_pb2.LoadModelRequest(name=model, path=str(worker_path))
        return _convert.model_info(self._call(self._models.LoadModel, request, timeout))

    def unload_model(self, model: str, *, timeout: float | None = None) -> None:
        """Stop serving a base model (admin key); its queued requests still run."""
        self._call(self._models.UnloadModel, models_pb2.UnloadModelRequest(name=model), timeout)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        adapter: str | None = None,
        *,
        output_names: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``inputs`` (name -> array) through ``model``, optionally with an adapter."""
        request = _convert.infer_request(model, inputs, adapter, output_names)
        return _convert.infer_outputs(self._call(self._inference.Infer, request, timeout))

    def stream_infer(
        self,
        requests: Iterable[InferRequest],
        *,
        window: int = 64,
        ordered: bool = False,
        raise_errors: bool = False,
        timeout: float | None = None,
    ) -> Iterator[InferResult]:
        """Send ``requests`` over one stream and yield an :class:`InferResult` for each.

        At most ``window`` requests are in flight (``requests`` is read lazily, so it may be
        endless). Results come as they complete, or in input order when ``ordered``. A request's
        error is yielded as its result's ``error`` unless ``raise_errors``. Stopping the iteration
        cancels the stream and the worker drops its queued requests.
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

        call = self._inference.InferStream(
            outgoing(), timeout=self.stream_timeout if timeout is None else timeout, metadata=self._metadata
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
        results = self.stream_infer(requests, window=window, ordered=True, raise_errors=True, timeout=timeout)
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
        return _convert.adapter_info(self._call(self._adapters.RegisterAdapter, requests, timeout))

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
        return _convert.adapter_info(self._call(self._adapters.RegisterAdapterFromPath, request, timeout))

    def get_adapter(self, model: str, adapter_id: str, *, timeout: float | None = None) -> AdapterInfo:
        request = adapters_pb2.GetAdapterRequest(model=model, adapter_id=adapter_id)
        return _convert.adapter_info(self._call(self._adapters.GetAdapter, request, timeout))

    def list_adapters(self, model: str | None = None, *, timeout: float | None = None) -> list[AdapterInfo]:
        """Every adapter of ``model`` (all models when None), across pages."""
        adapters: list[AdapterInfo] = []
        token = ""
        while True:
            request = adapters_pb2.ListAdaptersRequest(model=model or "", page_token=token)
            response = self._call(self._adapters.ListAdapters, request, timeout)
            adapters += [_convert.adapter_info(info) for info in response.adapters]
            token = response.next_page_token
            if not token:
                return adapters

    def delete_adapter(self, model: str, adapter_id: str, *, timeout: float | None = None) -> None:
        """Delete an adapter; requests already running on it finish first."""
        request = adapters_pb2.DeleteAdapterRequest(model=model, adapter_id=adapter_id)
        self._call(self._adapters.DeleteAdapter, request, timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        try:
            return method(
                request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise OrtmuxError.from_rpc_error(error) from None
