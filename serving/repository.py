"""The models being served: one verified version per model (the latest good one unless pinned).

Which version is served, and when it changes, is serving/control.py's job; here
are the served models, the refused versions and the models unloaded on request.
A request holds its model (`hold`) while it is answered, so a version that is
replaced or unloaded closes only after the requests that found it are done.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from serving.batching import DynamicBatcher
from serving.errors import NotFound, Unavailable
from serving.protocol import decimal
from serving.runtime import ModelRuntime
from serving.schema import ArtifactMeta

__all__ = ["LoadedModel", "ModelRepository"]


@dataclass(eq=False)  # compared and hashed by identity: two loads of one version are two models
class LoadedModel:
    """A model version ready to serve: its metadata, session and batcher."""

    runtime: ModelRuntime
    batcher: DynamicBatcher
    files: tuple = ()  # version_files() when it was read: a load request reloads the version when they change
    users: int = 0  # requests holding this version (see ModelRepository.hold); it closes once they are done

    @property
    def meta(self) -> ArtifactMeta:
        return self.runtime.meta


@dataclass
class ModelRepository:
    """Name -> the loaded model, the models being loaded, and the reasons versions or models were refused."""

    models: dict[str, LoadedModel] = field(default_factory=dict)
    refused: dict[str, dict[int, str]] = field(default_factory=dict)  # name -> version -> reason (paths relative to the repository)
    unloaded: dict[str, int] = field(default_factory=dict)  # name -> version unloaded through the repository API
    loading: set[str] = field(default_factory=set)  # models with a load under way
    unreadable: dict[str, str] = field(default_factory=dict)  # model folders that could not be listed -> why

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every model (version) the server knows, READY, LOADING or UNAVAILABLE with its reason."""
        rows = [{"name": n, "version": str(m.meta.version), "state": "READY"} for n, m in self.models.items()]
        if not ready_only:
            rows += [{"name": n, "version": "", "state": "LOADING"} for n in self.loading if n not in self.models]
            rows += [{"name": n, "version": str(v), "state": "UNAVAILABLE", "reason": why} for n, vs in self.refused.items() for v, why in vs.items()]
            rows += [{"name": n, "version": str(v), "state": "UNAVAILABLE", "reason": "unloaded"} for n, v in self.unloaded.items()]
            rows += [{"name": n, "version": "", "state": "UNAVAILABLE", "reason": why} for n, why in self.unreadable.items()]
        return sorted(rows, key=lambda r: (r["name"], int(r["version"] or 0)))

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The model `name` (at `version` if given); NotFound (404) saying what is available."""
        model = self.models.get(name)
        if model is None:
            if name in self.unloaded:
                raise NotFound(f"model {name!r} is unloaded; POST /v2/repository/models/{name}/load loads it")
            if name in self.loading:
                raise Unavailable(f"model {name!r} is being loaded; retry shortly")
            if name in self.unreadable:
                raise NotFound(f"model {name!r} could not be read; the repository index and the server log say why")
            if name in self.refused:  # the reasons are in the (restricted) repository index
                versions = ", ".join(map(str, sorted(self.refused[name])))
                raise NotFound(f"model {name!r} could not be loaded (version {versions} refused; the repository index and the server log say why)")
            raise NotFound(f"unknown model {name!r}; the repository index (POST /v2/repository/index) lists the models")
        number = decimal(version)
        if version is not None and number is None:
            raise NotFound(f"model {name!r} has no version {version!r} (versions are ASCII decimal numbers); the served version is {model.meta.version}")
        if number is not None and number != model.meta.version:
            why = " (refused at load; the repository index says why)" if number in self.refused.get(name, {}) else ""
            raise NotFound(f"model {name!r} has no version {version!r} loaded{why}; the served version is {model.meta.version}")
        return model

    @contextmanager
    def hold(self, name: str, version: str | None = None) -> Iterator[LoadedModel]:
        """The model as `get` finds it, kept open while the block runs even if another version replaces it."""
        model = self.get(name, version)
        model.users += 1
        try:
            yield model
        finally:
            model.users -= 1
