"""The models being served: one verified version per model (the latest good one unless pinned).

A version that fails verification or loading is refused with one log line and
the next older version is tried, so a corrupted new build does not take its
model (or any other) offline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from serving.artifact import ArtifactMeta, discover, read_artifact
from serving.batching import DynamicBatcher
from serving.errors import ArtifactError, NotFound
from serving.protocol import decimal
from serving.runtime import ModelRuntime

__all__ = ["LoadedModel", "ModelRepository", "load_runtimes"]

log = logging.getLogger("serving.repository")


@dataclass
class LoadedModel:
    """A model version ready to serve: its metadata, session and batcher."""

    runtime: ModelRuntime
    batcher: DynamicBatcher

    @property
    def meta(self) -> ArtifactMeta:
        return self.runtime.meta


@dataclass
class ModelRepository:
    """Name -> the loaded model, and the reasons versions were refused."""

    models: dict[str, LoadedModel] = field(default_factory=dict)
    refused: dict[str, dict[int, str]] = field(default_factory=dict)  # name -> version -> reason

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every model version the server knows, READY or UNAVAILABLE (reasons stay in the log)."""
        rows = [{"name": n, "version": str(m.meta.version), "state": "READY"} for n, m in self.models.items()]
        if not ready_only:
            rows += [
                {"name": n, "version": str(v), "state": "UNAVAILABLE", "reason": "refused at load; the server log says why"}
                for n, versions in self.refused.items()
                for v in versions
            ]
        return sorted(rows, key=lambda r: (r["name"], int(r["version"])))

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The model `name` (at `version` if given); NotFound (404) saying what is available."""
        model = self.models.get(name)
        if model is None:
            if name in self.refused:  # the reasons name server paths and hashes: they stay in the log
                versions = ", ".join(map(str, sorted(self.refused[name])))
                raise NotFound(f"model {name!r} could not be loaded (version {versions} refused; the server log says why)")
            raise NotFound(f"unknown model {name!r}; available models: {', '.join(sorted(self.models)) or 'none'}")
        number = decimal(version)
        if version is not None and number is None:
            raise NotFound(f"model {name!r} has no version {version!r} (versions are ASCII decimal numbers); the served version is {model.meta.version}")
        if number is not None and number != model.meta.version:
            why = " (refused at load; the server log says why)" if number in self.refused.get(name, {}) else ""
            raise NotFound(f"model {name!r} has no version {version!r} loaded{why}; the served version is {model.meta.version}")
        return model


def load_runtimes(
    models: Path, pinned: dict[str, int], providers: list[str], intra_op_threads: int
) -> tuple[dict[str, ModelRuntime], dict[str, dict[int, str]]]:
    """Sessions for every model of the repository, and the refused versions with their reasons (blocking)."""
    runtimes: dict[str, ModelRuntime] = {}
    refused: dict[str, dict[int, str]] = {}
    found = discover(models)
    for name in sorted(set(pinned) - set(found)):
        refused[name] = {pinned[name]: f"pinned, but {models / name} does not exist"}
        log.error("model %s: pinned to version %d but the repository has no such model", name, pinned[name])
    for name, versions in found.items():
        candidates = [pinned[name]] if name in pinned else versions
        if name in pinned and pinned[name] not in versions:
            refused.setdefault(name, {})[pinned[name]] = f"pinned, but versions present are {versions}"
            log.error("model %s: pinned to version %d, present versions: %s", name, pinned[name], versions)
            continue
        if not versions:
            log.warning("model %s: no version folder in %s; skipped", name, models / name)
            continue
        for version in candidates:
            try:
                runtime = ModelRuntime(read_artifact(models, name, version), providers, intra_op_threads)
            except ArtifactError as e:
                refused.setdefault(name, {})[version] = str(e)
                log.error("REFUSED model %s version %d: %s", name, version, e)
                continue
            runtimes[name] = runtime
            log.info(
                "loaded model %s version %d on %s (input %s %s, %d classes, max batch %d)",
                name, version, runtime.provider, runtime.meta.input.name,
                [-1, *runtime.meta.input.shape], len(runtime.meta.class_names), runtime.meta.max_batch_size,
            )
            break
    return runtimes, refused
