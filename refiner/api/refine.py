"""Refined models from Python: the module itself, a whole build with its verdict, an export into a model repository, serving."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from torch import nn

from refiner.api.fit import Fitted
from refiner.engine.isomorphism import IsomorphismNet
from refiner.errors import ConfigError
from refiner.data.samples import Preprocess
from refiner.data.tasks import get_task
from refiner.models.checkpoints import Classifier
from refiner.models.layers import kept_modes
from refiner.progress import note
from refiner.refine.config import BuildConfig
from refiner.refine.pipeline import BuildResult
from refiner.refine.pipeline import build as _build
from refiner.refine.publish import ExportOptions, Published, export_artifact
from refiner.refine.refined import RefinedModel, RefinedSpec, load_refined, refined_from_parts

__all__ = ["refined_model", "build", "export"]


def refined_model(
    model_a: nn.Module | Classifier, g: Fitted | IsomorphismNet, model_b: nn.Module | Classifier,
    layer_a: str | None = None, layer_b: str | None = None, classes: list[str] | None = None, preprocess: Preprocess | None = None,
) -> RefinedModel:  # fmt: skip
    """A's trunk -> frozen g -> B's upper layers with B's own classifier, as one nn.Module (the "Δ removal", paper Section 4.3).

    Copies of the nets' layers are used (the models handed in are not touched); the result is
    frozen, in eval mode, on the CPU, and carries `.spec`, what `export` needs to describe it.
    `classes`: the outputs of B it answers (default: all). With a `Fitted` g, its layers are used.
    `preprocess`: how images become its input (default: A's record; plain modules record none,
    so an export of their refined model needs it here or from `refiner.net(module, preprocess=...)`).

    Examples:
        >>> import refiner, torch
        >>> a, b = refiner.create_model("tiny_vgg", 4), refiner.create_model("tiny_vgg", 4)
        >>> fitted = refiner.fit(a, b, [torch.randn(16, 3, 16, 16) for _ in range(2)], steps=20)
        >>> model = refiner.refined_model(a, fitted, b)
        >>> x = torch.randn(2, 3, 16, 16)
        >>> torch.allclose(model(x), model.head(fitted.g(model.trunk(x))))
        True
    """
    clf_a, clf_b = Classifier.of(model_a), Classifier.of(model_b)
    if isinstance(g, Fitted):
        if g.report is not None:
            layer_a, layer_b = layer_a or g.report.a.layer, layer_b or g.report.b.layer
            for side, record in (("a", g.report.a), ("b", g.report.b)):
                clf = clf_a if side == "a" else clf_b
                if record.input_size is not None and not isinstance(model_a if side == "a" else model_b, Classifier):
                    clf = clf.fed_at(record.input_size)  # a plain module: fed as g was fitted
                clf_a, clf_b = (clf, clf_b) if side == "a" else (clf_a, clf)
        g = g.g
    la, lb = layer_a or clf_a.default_layer, layer_b or clf_b.default_layer
    copies = [copy.deepcopy(c) for c in (clf_a, clf_b)]  # the refined model owns its layers: freezing it leaves the caller's nets as they were
    model, spec = refined_from_parts(*copies, copy.deepcopy(g), la, lb, classes)
    model.spec = spec if preprocess is None else spec.model_copy(update={"preprocess": preprocess})
    model.preprocess_known = preprocess is not None or clf_a.preprocess_known
    return model


def build(
    model_a: nn.Module | Classifier, model_b: nn.Module | Classifier, task: str, data: str | Path | None = None, *,
    config: BuildConfig | None = None, name: str | None = None, models: str | Path = "models", classes: list[str] | None = None,
    split=None, cache_dir: str | Path | None = None, g: str | Path | None = None,
) -> BuildResult:  # fmt: skip
    """The whole `refiner build`: fit g, fine-tune the refined model and its baselines over seeds, test, export a new version.

    Returns the typed result: `.verdict` (Δ removal helps / hurts / is within noise, from the
    declared paired test), `.accuracies`, `.paired` (tests with their noise budget), `.model`
    (the refined nn.Module) and `.path` (models/<name>/<version>, with report.html).
    `task`: a registered task (`refiner.list_tasks()`; `refiner.register_task` adds one) read from `data`.
    `config`: seeds, protocol, head schedule, g and export options (default: `BuildConfig(name=...)`).
    `g`: a g file from `Fitted.save` or `refiner fit` for these nets, used instead of fitting one.
    Plain nn.Modules are fed as the task preprocesses its images (use `refiner.net` to say otherwise).

    Examples:
        >>> import refiner, tempfile, torch
        >>> _ = torch.manual_seed(0)
        >>> a, b = refiner.create_model("tiny_vgg", 10), refiner.create_model("tiny_vgg", 10)
        >>> quick = refiner.BuildConfig(name="tiny", seeds=1, ablations=False, head={"epochs": 1},
        ...                             compare={"fit": {"max_steps": 20}})
        >>> result = refiner.build(a, b, "digits", config=quick, models=tempfile.mkdtemp())  # doctest: +ELLIPSIS
        >>> result.path.name, sorted(result.accuracies)[0], result.verdict.startswith("Δ removal")
        ('1', "control: x_B minus another image's x^Δ", True)
    """
    config = config or BuildConfig(name=name or f"{task}-refined")
    if name is not None and name != config.name:
        config = config.model_copy(update={"name": name})
    clf_a, clf_b = (_fed_as_task(Classifier.of(m), task, who) for m, who in ((model_a, "A"), (model_b, "B")))
    with kept_modes(clf_a.model, clf_b.model):
        return _build(
            clf_a, clf_b, task, Path(data) if data is not None else None, config, models=Path(models),
            classes=classes, split=split, cache_dir=Path(cache_dir) if cache_dir is not None else None, g_file=Path(g) if g is not None else None,
        )  # fmt: skip


def _fed_as_task(clf: Classifier, task: str, who: str) -> Classifier:
    """A plain module (no recorded preprocessing) is fed as the task's images are preprocessed; the choice is logged."""
    if clf.preprocess_known:
        return clf
    pre = get_task(task).preprocess
    note(f"net {who} is a plain module with no recorded preprocessing: fed as task {task!r} preprocesses ({pre.input_size[1]}x{pre.input_size[2]}, "
         f"mean {pre.mean}, std {pre.std}); pass refiner.net(module, preprocess=...) if it was trained otherwise")  # fmt: skip
    meta = clf.meta.model_copy(update={"preprocess": pre})
    return dataclasses.replace(clf, meta=meta, preprocess_known=True, preprocess_from=f"task {task!r}")


def export(
    model: RefinedModel | str | Path, name: str, *, models: str | Path = "models", options: ExportOptions | None = None,
    task: str | None = None, data: str | Path | None = None, split=None, spec: RefinedSpec | None = None,
    preprocess: Preprocess | None = None,
) -> Published:  # fmt: skip
    """A refined model (from `refined_model`, a build, or a refined.pt) as the next version of `name` in a model repository.

    The ONNX file is validated against PyTorch at another batch size (optionally fp16 or INT8,
    see `ExportOptions`); the version folder appears only when complete. `task`/`data` give the
    images that check it (else seeded random inputs; INT8 needs them). `preprocess` replaces the
    spec's, and is required for a model made from plain nn.Modules (their normalisation is unknown).

    Examples:
        >>> import refiner, torch, tempfile
        >>> a, b = refiner.create_model("tiny_vgg", 4), refiner.create_model("tiny_vgg", 4)
        >>> fitted = refiner.fit(a, b, [torch.randn(16, 3, 16, 16) for _ in range(2)], steps=20)
        >>> pre = refiner.Preprocess(input_size=(3, 16, 16), mean=(0.3,) * 3, std=(0.37,) * 3)
        >>> out = refiner.export(refiner.refined_model(a, fitted, b), "tiny", models=tempfile.mkdtemp(), preprocess=pre)
        >>> out.version, out.check.max_abs_diff < 1e-4
        (1, True)
    """
    if isinstance(model, (str, Path)):
        model, spec = load_refined(model)
    spec = spec or getattr(model, "spec", None)
    if spec is None:
        raise ConfigError("this refined model carries no spec: make it with refiner.refined_model, or pass spec=")
    if preprocess is not None:
        spec = spec.model_copy(update={"preprocess": preprocess})
    elif not getattr(model, "preprocess_known", True):
        raise ConfigError(
            "the refined model was made from plain nn.Modules, which record no preprocessing, so a served model would not "
            f"know how to normalise images (only the input size {spec.preprocess.input_size} is known): pass "
            "preprocess=refiner.Preprocess(input_size=..., mean=..., std=...) as the nets were trained, or give the nets "
            "with refiner.net(module, preprocess=...)"
        )
    return export_artifact(model, spec, Path(models), name, options or ExportOptions(), task, Path(data) if data is not None else None, split)
