"""refiner: compare what two trained networks know and build refined, deployable models from it.

    >>> import refiner
    >>> result = refiner.atlas(model_a, model_b, loader)            # doctest: +SKIP
    >>> fitted = refiner.fit(model_a, model_b, loader, steps=2000)  # doctest: +SKIP

Data flows one way through the subpackages: `data` (tasks, preprocessing) ->
`models` (architectures, checkpoints, layer cuts) -> `engine` (features, g,
fitting, the Var table, training loops) -> `layermap` (the atlas), `refine`
(refined model, export, model repository) and `analyses` (the paper's other
applications) -> `api` (the public functions below) -> `cli`. The artifact
format is defined once, in `serving.schema`, which refiner writes with and the server reads. Names are imported on first use, so
`import refiner` stays cheap (no torch until a function is touched).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    # nets
    "load": "refiner.api.nets", "net": "refiner.api.nets", "layers": "refiner.api.nets", "Layer": "refiner.api.nets", "features": "refiner.api.nets",
    "Classifier": "refiner.models.checkpoints", "Preprocess": "refiner.data.samples",
    "create_model": "refiner.models.architectures", "register_arch": "refiner.models.registry",
    "list_archs": "refiner.models.registry", "ArchSpec": "refiner.models.registry",
    "register_task": "refiner.data.tasks", "list_tasks": "refiner.data.tasks", "TaskSpec": "refiner.data.tasks",
    "load_task": "refiner.data.tasks", "loader": "refiner.api.data",
    # comparing
    "atlas": "refiner.api.atlas", "Atlas": "refiner.api.atlas",
    "fit": "refiner.api.fit", "fit_features": "refiner.api.fit", "Fitted": "refiner.api.fit",
    # refined models
    "refined_model": "refiner.api.refine", "build": "refiner.api.refine", "export": "refiner.api.refine",
    "serve": "refiner.api.serving", "Server": "refiner.api.serving",
    "BuildConfig": "refiner.refine.config", "ExportOptions": "refiner.refine.publish",
    "IsomorphismConfig": "refiner.engine.isomorphism", "FitConfig": "refiner.engine.fitting",
    # the paper's other applications
    "diagnose": "refiner.analyses.diagnose", "stability": "refiner.analyses.stability",
    "compression": "refiner.analyses.compression", "distillation": "refiner.analyses.distillation",
    "AnalysisConfig": "refiner.analyses.measure", "DiagnoseConfig": "refiner.analyses.diagnose",
    "StabilityConfig": "refiner.analyses.stability", "CompressionConfig": "refiner.analyses.compression",
    "DistillationConfig": "refiner.analyses.distillation", "TrainConfig": "refiner.engine.training",
    # manners
    "set_progress": "refiner.progress",
    "RefinerError": "refiner.errors", "ConfigError": "refiner.errors", "CheckpointError": "refiner.errors",
    "UnsafeCheckpointError": "refiner.errors", "LayerError": "refiner.errors", "DataError": "refiner.errors",
    "DataLayoutError": "refiner.errors", "ExportValidationError": "refiner.errors", "DivergedError": "refiner.errors",
}  # fmt: skip

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    """Import a public name's module on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'refiner' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
