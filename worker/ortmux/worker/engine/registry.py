"""The base models a worker serves, by name, including those still loading."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.cache import ModelCache
from ortmux.worker.engine.runtime import RuntimeOptions, release_freed_memory
from ortmux.worker.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable


class ModelRegistry:
    def __init__(
        self,
        runtime: RuntimeOptions,
        cache: ModelCache,
        overridable: Sequence[str] = (),
        sequence_limits: Mapping[str, int] | None = None,
    ) -> None:
        """``sequence_limits``: the longest sequence each model takes, by name ("" for every
        model without its own); a model's own limit applies where none is set."""
        self.runtime = runtime
        self.cache = cache
        self.overridable = tuple(overridable)
        self.sequence_limits = dict(sequence_limits or {})
        self._models: dict[str, BaseModel] = {}
        self._loading: set[str] = set()
        self._lock = threading.Lock()

    def load(self, name: str, path: Path) -> BaseModel:
        self._reserve([name])
        return self._load_reserved(name, path)

    def load_all(self, paths: Mapping[str, Path]) -> None:
        """Load several models in order; all of them report as loading until their turn."""
        self._reserve(list(paths))
        try:
            for name, path in paths.items():
                self._load_reserved(name, path)
        finally:
            with self._lock:
                self._loading.difference_update(paths)  # those never reached after a failure

    def _reserve(self, names: Sequence[str]) -> None:
        """Mark names as loading, refusing empty, served or already loading ones."""
        with self._lock:
            for name in names:
                if not name:
                    raise InvalidArgument("model name is empty", field="name")
                if name in self._models or name in self._loading:
                    raise AlreadyExists(f"model '{name}' is already served", field="name")
            self._loading.update(names)

    def _load_reserved(self, name: str, path: Path) -> BaseModel:
        try:
            limit = self.sequence_limits.get(name, self.sequence_limits.get("", 0))
            model = BaseModel(name, path, self.runtime, self.cache, self.overridable, limit)
            with self._lock:
                self._models[name] = model
            return model
        finally:
            with self._lock:
                self._loading.discard(name)
            release_freed_memory()

    def get(self, name: str) -> BaseModel:
        if not name:
            raise InvalidArgument("model name is empty", field="model")
        with self._lock:
            model = self._models.get(name)
            loading = name in self._loading
            known = sorted(self._models)
        if model is not None:
            return model
        if loading:
            raise Unavailable(f"model '{name}' is loading; retry shortly", field="model", retry_after=1.0)
        raise NotFound(
            f"model '{name}' is not served here; served: {', '.join(known) or 'none'}", field="model"
        )

    def unload(self, name: str) -> BaseModel:
        """Stop serving a model; its sessions close once the last run holding them ends."""
        with self._lock:
            if name in self._loading:
                raise Unavailable(f"model '{name}' is loading; unload it once it is ready", retry_after=1.0)
            model = self._models.pop(name, None)
        if model is None:
            raise NotFound(f"model '{name}' is not served here", field="name")
        return model

    def all(self) -> list[BaseModel]:
        with self._lock:
            return [self._models[name] for name in sorted(self._models)]

    def loading(self) -> list[str]:
        with self._lock:
            return sorted(self._loading)
