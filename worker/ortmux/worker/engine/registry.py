"""The base models a worker serves, by name."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

from ortmux.worker.engine.base_model import BaseModel, RuntimeOptions
from ortmux.worker.errors import AlreadyExists, InvalidArgument, NotFound


class ModelRegistry:
    def __init__(self, runtime: RuntimeOptions) -> None:
        self.runtime = runtime
        self._models: dict[str, BaseModel] = {}
        self._lock = threading.Lock()

    def load(self, name: str, path: Path) -> BaseModel:
        if not name:
            raise InvalidArgument("model name is empty", field="name")
        with self._lock:
            if name in self._models:
                raise AlreadyExists(f"model '{name}' is already served", field="name")
        model = BaseModel(name, path, self.runtime)
        with self._lock:
            if name in self._models:
                raise AlreadyExists(f"model '{name}' is already served", field="name")
            self._models[name] = model
        return model

    def load_all(self, paths: Mapping[str, Path]) -> None:
        for name, path in paths.items():
            self.load(name, path)

    def get(self, name: str) -> BaseModel:
        if not name:
            raise InvalidArgument("model name is empty", field="model")
        with self._lock:
            model = self._models.get(name)
            known = sorted(self._models)
        if model is None:
            raise NotFound(
                f"model '{name}' is not served here; served: {', '.join(known) or 'none'}", field="model"
            )
        return model

    def all(self) -> list[BaseModel]:
        with self._lock:
            return [self._models[name] for name in sorted(self._models)]
