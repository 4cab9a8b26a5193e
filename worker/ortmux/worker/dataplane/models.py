"""Which base models the worker serves: the model-name and path rules, loading (the start-up
models and LoadModel alike, through the same checks) and unloading, and who hears of changes."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.registry import ModelRegistry
from ortmux.worker.errors import InvalidArgument, NotFound, PermissionDenied

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelManagement:
    """The rules a model must pass to be served, over the engine's registry of loaded models."""

    def __init__(self, registry: ModelRegistry, worker_paths: Sequence[Path] = ()) -> None:
        self.registry = registry
        self.worker_paths = tuple(Path(p).resolve() for p in worker_paths)
        self._changed: list[Callable[[], None]] = []
        self._unloaded: list[Callable[[str], None]] = []

    def on_changed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after a model is loaded or unloaded at runtime."""
        self._changed.append(callback)

    def on_unloaded(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(name)`` once a model no longer serves (its queue can close)."""
        self._unloaded.append(callback)

    def readable(self, path: Path) -> Path:
        """``path`` resolved, when it lies under one of ``worker_paths`` (or any path without them)."""
        resolved = path.resolve()
        if self.worker_paths and not any(resolved.is_relative_to(root) for root in self.worker_paths):
            raise PermissionDenied(
                f"{path} is outside the directories this worker reads from (worker_paths)", field="path"
            )
        return resolved

    def checked(self, name: str, path: Path, own_file: bool = False) -> Path:
        """The model file to load as ``name``: a valid name, a file under the allowed paths
        (``own_file``: one the worker wrote itself, the demo model)."""
        if not MODEL_NAME.match(name):
            raise InvalidArgument(
                f"model name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
                field="name",
            )
        path = path.resolve() if own_file else self.readable(path)
        if not path.is_file():
            raise NotFound(f"no model file at {path}", field="path")
        return path

    def get(self, name: str) -> BaseModel:
        return self.registry.get(name)

    def all(self) -> list[BaseModel]:
        return self.registry.all()

    def loading(self) -> list[str]:
        return self.registry.loading()

    def load_all(self, paths: Mapping[str, Path], own_files: bool = False) -> None:
        """The start-up models, in order, each through the same checks as ``load``."""
        self.registry.load_all({name: self.checked(name, path, own_files) for name, path in paths.items()})

    def load(self, name: str, path: Path) -> BaseModel:
        """Load a base model at runtime; returns once it serves."""
        model = self.registry.load(name, self.checked(name, path))
        self._notify()
        return model

    def unload(self, name: str) -> None:
        """Stop serving a model: new requests are refused, queued ones still run."""
        self.registry.unload(name)
        for callback in self._unloaded:
            callback(name)
        self._notify()

    def _notify(self) -> None:
        for callback in self._changed:
            callback()
