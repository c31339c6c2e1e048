"""Task registry: which dataset, which classes for base nets and for the target, which splits.

Each task reads the dataset's standard layout from a user-given folder (nothing
is downloaded). Splits are deterministic. Validation is the dataset's own val/
folder when it has one, else carved from training data per class; base nets
trained on all of that training data have seen it, so `val_from="test"` takes
a seeded stratified half of the test split instead (the other half is scored).
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from refiner.data.samples import ArraySample, FileSample, Preprocess, Sample
from refiner.errors import ConfigError, DataError, DataLayoutError

__all__ = ["TaskSpec", "TaskData", "SplitOptions", "register_task", "get_task", "list_tasks", "load_task", "check_task", "same_dataset", "did_you_mean", "validation_source"]

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CIFAR = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
VAL_GAP_POINTS = 15.0  # validation accuracy this far above test accuracy suggests validation the base nets were trained on
VAL_SOURCES = {"train": "carved from the training data", "val": "the dataset's val/ folder", "test": "half of the test split"}

Loader = Callable[[Path | None], dict[str, list[Sample]]]


@dataclass(frozen=True)
class TaskSpec:
    """A task: its loader, base classes (None: all found), target classes and preprocessing (see `register_task`).

    Examples:
        >>> import refiner
        >>> spec = refiner.TaskSpec("pets", "my pet photos", lambda root: {}, None, None, refiner.Preprocess())
        >>> spec.needs_data
        True
    """

    name: str
    description: str
    load: Loader  # data dir -> {"train": [...], "test": [...]}, and "val": [...] when the dataset has its own
    base_classes: tuple[str, ...] | None
    target_classes: tuple[str, ...] | Callable[[list[str]], list[str]] | None  # None: all found
    preprocess: Preprocess
    needs_data: bool = True


class SplitOptions(BaseModel):
    """How to carve splits from a task's data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)  # share of each class's training data held out
    subset: str | None = Field(None, pattern="^half-[ab]$")  # disjoint halves of training data, as in the paper
    train_per_class: int | None = Field(None, ge=1)  # keep at most this many training images per class (val shrinks in proportion)
    test_per_class: int | None = Field(None, ge=1)  # keep the first N test images per class (cheaper scoring; None: all)
    skip_bad_images: bool = False  # leave out files that do not decode as images (with a warning), instead of failing
    imbalance: float | None = Field(None, ge=1)  # base classes only: non-target classes keep this many times the images of each target class
    seed: int = 0  # fixed: the same data always gives the same splits
    val_from: Literal["train", "val", "test"] | None = None  # validation: carved from train, the val/ folder, or half of test (disjoint from the half scored); None: val/ if present, else train


@dataclass
class TaskData:
    """Deterministic train/val/test samples for a class list."""

    task: str
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    preprocess: Preprocess
    root: Path | None = None  # the --data folder, resolved (None: bundled data)
    val_from: Literal["train", "val", "test"] = "train"  # where validation came from (see SplitOptions.val_from)

    def split(self, name: str) -> list[Sample]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def validation_line(self) -> str:
        """Where validation (which picks epochs and the exported run) came from, and whether base nets saw it, in one line."""
        return validation_source(self.val_from)

    def overlap_warning(self, val_acc: list[float], test_acc: list[float], what: str) -> str | None:
        """A warning when `what`'s mean validation accuracy is more than VAL_GAP_POINTS above its mean test accuracy, else None.

        Validation that the base nets were trained on (carved from the same train/) reads
        high and picks epochs badly; the warning names the two ways to avoid it.
        """
        if not val_acc or not test_acc or self.val_from == "test":  # two halves of one test split: a gap is noise, not overlap
            return None
        val, test = 100 * sum(val_acc) / len(val_acc), 100 * sum(test_acc) / len(test_acc)
        if val - test <= VAL_GAP_POINTS:
            return None
        return (
            f"{what}'s mean validation accuracy ({val:.1f} %) is {val - test:.1f} points above its test accuracy ({test:.1f} %): validation "
            f"({VAL_SOURCES[self.val_from]}) probably holds images the base nets were trained on, and it picks the epochs; "
            "give the dataset a val/ folder of images the nets never saw (imagefolder: DIR/val/<class>/), or pass "
            "--val-from test (half of the test split, disjoint from the half scored)"
        )


def validation_source(val_from: str | None) -> str:
    """One line on a validation source: what it is, whether base nets trained on the task saw it, the flag that avoids it."""
    if val_from == "train":
        return (
            "validation: carved from the training data, which base nets trained on this task have seen (validation accuracy "
            "then reads high and picks epochs badly); --val-from test takes half of the test split instead, or give the "
            "dataset a val/ folder of unseen images"
        )
    if val_from == "val":
        return "validation: the dataset's val/ folder (unseen by base nets trained on its train/ only)"
    if val_from == "test":
        return "validation: a seeded half of the test split (unseen by the base nets; the other half is scored)"
    return "validation: not recorded (an older report)"


_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Make a task a first-class name (`--task`, `refiner.build(..., task=...)`); a registered name is replaced.

    Examples:
        >>> import refiner
        >>> from refiner.data.tasks import TaskSpec, _load_imagefolder
        >>> spec = TaskSpec("pets", "my pet photos, <class>/<image>", _load_imagefolder, None, None, refiner.Preprocess(input_size=(3, 64, 64)))
        >>> "pets" in refiner.list_tasks(), refiner.register_task(spec).name in refiner.list_tasks()
        (False, True)
    """
    if not isinstance(spec, TaskSpec):
        raise ConfigError(f"register_task takes a TaskSpec, got {type(spec).__name__}")
    _REGISTRY[spec.name] = spec
    return spec


def list_tasks() -> list[str]:
    """The registered task names (`register_task` adds one).

    Examples:
        >>> import refiner
        >>> "digits" in refiner.list_tasks()
        True
    """
    return sorted(_REGISTRY)


def get_task(name: str) -> TaskSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown task {name!r}{did_you_mean(name, list_tasks())}; valid tasks: {', '.join(list_tasks())}")
    return _REGISTRY[name]


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x'?)' for the closest names, or ''."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def check_task(name: str, data: Path | None, classes: list[str] | None = None) -> None:
    """What can be checked of a task's arguments without reading its images (milliseconds, no torch): the name, the data
    folder and its layout (the folders the task's loader needs), and `classes` against the class names the layout shows."""
    spec = get_task(name)
    if spec.needs_data and data is None:
        raise ConfigError(f"task {name!r} reads a dataset from disk: pass --data DIR ({spec.description})")
    if data is not None and not Path(data).is_dir():
        raise DataLayoutError(f"data folder {str(data)!r} does not exist" if not Path(data).exists() else f"--data {str(data)!r} is a file, not a folder")
    quick = _QUICK_CLASSES.get(spec.load)
    found = quick(Path(data) if data is not None else None) if quick is not None else None
    if classes and found is not None:
        missing = [c for c in classes if c not in found]
        if missing:
            hints = "".join(did_you_mean(c, found) for c in missing[:3])
            shown = ", ".join(found[:30]) + (f", ... ({len(found)} in all)" if len(found) > 30 else "")
            raise DataError(f"classes {missing} are not in the {name!r} training data{hints}; found {len(found)} classes: {shown}")


def _class_dirs(root: Path) -> list[str]:
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise DataLayoutError(f"expected one sub-folder per class in {str(root)!r}, found none")
    return found


def _quick_imagefolder(data: Path | None) -> list[str]:
    assert data is not None
    if (data / "train").is_dir():
        _require(data / "test", "a test/ folder beside train/")
        return _class_dirs(data / "train")
    return _class_dirs(data)


def _quick_cifar10(data: Path | None) -> list[str]:
    assert data is not None
    root = data / "cifar10" if (data / "cifar10").is_dir() else data
    for split in ("train", "test"):
        folder = _require(root / split, f"CIFAR-10's {split}/<class>/ folders")
        for c in CIFAR10_CLASSES:
            _require(folder / c, f"the CIFAR-10 class folder {split}/{c}/")
    return list(CIFAR10_CLASSES)


def _quick_voc(data: Path | None) -> list[str]:
    assert data is not None
    root = next((p for p in (data / "VOCdevkit" / "VOC2012", data / "VOC2012", data) if (p / "Annotations").is_dir()), data)
    _require(root / "Annotations", "VOC2012's Annotations/ folder")
    return list(VOC_CLASSES)


def same_dataset(a: str, b: str) -> bool:
    """Whether two tasks read the same dataset with the same splits (cifar10 and cifar-animal do)."""
    return get_task(a).load is get_task(b).load


def load_task(
    name: str,
    data: Path | None = None,
    *,
    target: bool = False,
    classes: list[str] | None = None,
    options: SplitOptions | None = None,
) -> TaskData:
    """Load a task's splits for its base classes (target=False) or target classes (target=True).

    `classes` overrides the task's class list (required for `imagefolder` targets).

    Examples:
        >>> import refiner
        >>> digits = refiner.load_task("digits")
        >>> digits.classes[:3], len(digits.train) > len(digits.test) > 0
        (['0', '1', '2'], True)
    """
    spec = get_task(name)
    options = options or SplitOptions()
    if spec.needs_data and data is None:
        raise ConfigError(f"task {name!r} reads a dataset from disk: pass --data DIR")
    if data is not None and not Path(data).is_dir():
        raise DataLayoutError(f"data folder {str(data)!r} does not exist")
    raw = spec.load(Path(data) if data is not None else None)
    val_from = options.val_from or ("val" if "val" in raw else "train")
    if val_from == "val" and "val" not in raw:
        raise DataLayoutError(
            f"--val-from val: task {name!r} found no validation folder in {str(data)!r} (imagefolder: DIR/val/<class>/ "
            "beside DIR/train/ and DIR/test/); use --val-from train or --val-from test"
        )
    found = sorted({s.label for s in raw["train"]})
    chosen = spec.target_classes if target else spec.base_classes
    wanted = classes or list((chosen(found) if callable(chosen) else chosen) or found)
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DataError(
            f"classes {missing} are not in the {name!r} training data; found {len(found)} classes: {', '.join(found)}"
        )
    keep = set(wanted)
    train = [s for s in raw["train"] if s.label in keep]
    test = [s for s in raw["test"] if s.label in keep]
    if val_from == "train":
        train, val = _carve(train, options.val_fraction, options.seed)
    elif val_from == "val":
        val = [s for s in raw["val"] if s.label in keep]
    else:  # a seeded stratified half of test; the other half is the test split everywhere (scoring, Var tables, INT8)
        test, val = _carve(test, 0.5, options.seed)
    if options.subset:
        train = _half(train, options.subset, options.seed)
    if options.train_per_class:
        train = _per_class(train, options.train_per_class)
        if val_from == "train":  # validation in proportion to the kept training data (still carved before trimming, so disjoint)
            val = _per_class(val, max(1, round(options.train_per_class * options.val_fraction / (1 - options.val_fraction))))
    if options.test_per_class:
        test = _per_class(test, options.test_per_class)
    if options.skip_bad_images:
        train, val, test = (_readable(name, part) for part, name in ((train, "train"), (val, "val"), (test, "test")))
    if options.imbalance and not target:
        train = _imbalanced(train, _target_classes(spec, found), options.imbalance)
        if val_from == "train":  # carved validation follows the training data; a val/ folder or test half is left as given
            val = _imbalanced(val, _target_classes(spec, found), options.imbalance)
    for split_name, split in (("train", train), ("val", val), ("test", test)):
        have = {s.label for s in split}
        if not split or (missing := [c for c in wanted if c not in have]):
            raise DataError(f"the {split_name} split of task {name!r} has no images of classes {missing or wanted}")
    return TaskData(name, wanted, train, val, test, spec.preprocess, Path(data).resolve() if data is not None else None, val_from)


def _by_class(samples: list[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.label, []).append(s)
    return groups


def _shuffled(items: list[Sample], seed: int, label: str) -> list[Sample]:
    rng = np.random.default_rng([seed, sum(label.encode())])
    return [items[i] for i in rng.permutation(len(items))]


def _carve(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per class, hold out `fraction` (at least one image) as the second list."""
    keep, held = [], []
    for label, group in _by_class(samples).items():
        group = _shuffled(group, seed, label)
        n_held = max(1, round(len(group) * fraction)) if len(group) > 1 else 0
        held += group[:n_held]
        keep += group[n_held:]
    return keep, held


def _readable(split: str, samples: list[Sample]) -> list[Sample]:
    """The samples whose files decode; the others are counted in a warning."""
    ok = [not isinstance(s, FileSample) or s.readable() for s in samples]
    keep = [s for s, good in zip(samples, ok) if good]
    if len(keep) < len(samples):
        bad = [s for s, good in zip(samples, ok) if not good]
        warnings.warn(f"left out {len(bad)} unreadable images of the {split} split, e.g. {str(bad[0].path)!r}", stacklevel=3)
    return keep


def _target_classes(spec: TaskSpec, found: list[str]) -> set[str]:
    chosen = spec.target_classes
    if chosen is None:
        raise ConfigError(f"task {spec.name!r} has no separate target classes, so --imbalance has nothing to under-represent")
    target = set(chosen(found) if callable(chosen) else chosen)
    if target >= set(spec.base_classes or found):
        raise ConfigError(f"task {spec.name!r} targets all its classes, so --imbalance has nothing to over-represent; use a task such as cifar-animal")
    return target


def _imbalanced(samples: list[Sample], target: set[str], ratio: float) -> list[Sample]:
    """Keep 1/ratio of each target class, so non-target classes are over-represented (as "person" is in VOC)."""
    out = []
    for label, group in _by_class(samples).items():
        out += group[: max(1, round(len(group) / ratio))] if label in target else group
    return out


def _half(samples: list[Sample], which: str, seed: int) -> list[Sample]:
    out = []
    for label, group in _by_class(samples).items():
        group = _shuffled(group, seed + 1, label)
        mid = len(group) // 2
        out += group[:mid] if which == "half-a" else group[mid:]
    return out


def _per_class(samples: list[Sample], n: int) -> list[Sample]:
    return [s for group in _by_class(samples).values() for s in group[:n]]


# --- loaders -----------------------------------------------------------------------------


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataLayoutError(f"expected {what} at {str(path)!r}, but it does not exist")
    return path


def _load_digits(_: Path | None) -> dict[str, list[Sample]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    samples: list[Sample] = [ArraySample(img, str(int(t))) for img, t in zip(images, digits.target)]
    train, test = _carve(samples, 0.2, seed=7)
    return {"train": train, "test": test}


def _folder_samples(root: Path) -> list[Sample]:
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataLayoutError(f"expected one sub-folder per class in {str(root)!r}, found none")
    return [
        FileSample(f, c.name)
        for c in classes
        for f in sorted(c.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]


def _load_imagefolder(data: Path | None) -> dict[str, list[Sample]]:
    assert data is not None
    if (data / "train").is_dir():
        out = {"train": _folder_samples(data / "train"), "test": _folder_samples(_require(data / "test", "a test/ folder beside train/"))}
        if (data / "val").is_dir():
            out["val"] = _folder_samples(data / "val")
        return out
    train, test = _carve(_folder_samples(data), 0.2, seed=7)
    return {"train": train, "test": test}


def _load_cifar10(data: Path | None) -> dict[str, list[Sample]]:
    assert data is not None
    root = data / "cifar10" if (data / "cifar10").is_dir() else data
    out = {}
    for split in ("train", "test"):
        folder = _require(root / split, f"CIFAR-10's {split}/<class>/ folders")
        for c in CIFAR10_CLASSES:
            _require(folder / c, f"the CIFAR-10 class folder {split}/{c}/")
        out[split] = _folder_samples(folder)
    return out


def _voc_objects(root: Path, image_set: str, classes: list[str]) -> list[Sample]:
    ids = _require(root / "ImageSets" / "Main" / f"{image_set}.txt", "VOC's image set list").read_text().split()
    samples: list[Sample] = []
    for image_id in ids:
        tree = ET.parse(_require(root / "Annotations" / f"{image_id}.xml", "a VOC annotation"))
        for obj in tree.findall("object"):
            name = obj.findtext("name", "").strip()
            if name not in classes or obj.findtext("difficult", "0").strip() == "1":
                continue
            box = obj.find("bndbox")
            xyxy = tuple(int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
            samples.append(FileSample(root / "JPEGImages" / f"{image_id}.jpg", name, (xyxy[0] - 1, xyxy[1] - 1, xyxy[2], xyxy[3])))
    return samples


def _load_voc(data: Path | None) -> dict[str, list[Sample]]:
    assert data is not None
    root = next((p for p in (data / "VOCdevkit" / "VOC2012", data / "VOC2012", data) if (p / "Annotations").is_dir()), data)
    _require(root / "Annotations", "VOC2012's Annotations/ folder")
    # VOC's test annotations are not public: its "val" list serves as the test split.
    return {"train": _voc_objects(root, "train", VOC_CLASSES), "test": _voc_objects(root, "val", VOC_CLASSES)}


def _cub_root(data: Path) -> Path:
    return data / "CUB_200_2011" if (data / "CUB_200_2011").is_dir() else data


def _load_cub(data: Path | None) -> dict[str, list[Sample]]:
    assert data is not None
    root = _cub_root(data)

    def table(name: str) -> dict[str, list[str]]:
        lines = _require(root / name, f"CUB-200-2011's {name}").read_text().splitlines()
        return {parts[0]: parts[1:] for parts in (line.split() for line in lines if line.strip())}

    images, labels, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    boxes, classes = table("bounding_boxes.txt"), table("classes.txt")
    out: dict[str, list[Sample]] = {"train": [], "test": []}
    for image_id, (rel,) in images.items():
        x, y, w, h = (float(v) for v in boxes[image_id])
        box = (int(x), int(y), int(x + w), int(y + h))
        label = classes[labels[image_id][0]][0]
        out["train" if is_train[image_id][0] == "1" else "test"].append(FileSample(root / "images" / rel, label, box))
    return out


def _load_dogs(data: Path | None) -> dict[str, list[Sample]]:
    assert data is not None
    from scipy.io import loadmat

    root = data / "StanfordDogs" if (data / "StanfordDogs").is_dir() else data
    out: dict[str, list[Sample]] = {}
    for split in ("train", "test"):
        mat = loadmat(_require(root / f"{split}_list.mat", f"Stanford Dogs' {split}_list.mat"))
        out[split] = []
        for entry in mat["file_list"]:
            while isinstance(entry, np.ndarray):  # MATLAB cells nest one string in arrays
                entry = entry.flat[0]
            rel = str(entry)  # e.g. n02085620-Chihuahua/n02085620_10074.jpg
            ann = ET.parse(_require(root / "Annotation" / rel.removesuffix(".jpg"), "a Stanford Dogs annotation"))
            bb = ann.find("object/bndbox")
            box = tuple(int(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            out[split].append(FileSample(root / "Images" / rel, rel.split("/")[0], box))
    return out


def _load_mix(data: Path | None) -> dict[str, list[Sample]]:
    assert data is not None
    cub = _load_cub(_require(data / "CUB_200_2011", "the CUB_200_2011/ folder of the mix").parent)
    dogs = _load_dogs(_require(data / "StanfordDogs", "the StanfordDogs/ folder of the mix"))
    return {split: cub[split] + dogs[split] for split in ("train", "test")}


def _cub_classes(found: list[str]) -> list[str]:
    return [c for c in found if c[:3].isdigit() and c[3:4] == "."]  # "001.Black_footed_Albatross"


def _dog_classes(found: list[str]) -> list[str]:
    return [c for c in found if c.startswith("n") and "-" in c]  # "n02085620-Chihuahua"


_QUICK_CLASSES: dict[Loader, Callable[[Path | None], list[str]]] = {  # the class names of a layout, read without its images
    _load_digits: lambda _: [str(i) for i in range(10)],
    _load_imagefolder: _quick_imagefolder,
    _load_cifar10: _quick_cifar10,
    _load_voc: _quick_voc,
}

_224 = Preprocess(input_size=(3, 224, 224), **IMAGENET)
register_task(TaskSpec("digits", "scikit-learn's bundled 8x8 handwritten digits (no download); target: digits 0-5",
                   _load_digits, None, tuple("012345"), Preprocess(input_size=(3, 16, 16), mean=(0.3,) * 3, std=(0.37,) * 3), needs_data=False))
register_task(TaskSpec("cifar10", "CIFAR-10 as ImageFolder (train/, test/); target: all 10 classes",
                   _load_cifar10, tuple(CIFAR10_CLASSES), tuple(CIFAR10_CLASSES), Preprocess(input_size=(3, 32, 32), **CIFAR)))
register_task(TaskSpec("cifar-animal", "CIFAR-10; base nets on 10 classes, target: the 6 animal classes",
                   _load_cifar10, tuple(CIFAR10_CLASSES), ("bird", "cat", "deer", "dog", "frog", "horse"), Preprocess(input_size=(3, 32, 32), **CIFAR)))
register_task(TaskSpec("voc-animal", "Pascal VOC 2012 objects cropped by box; base: 20 classes, target: 6 animals",
                   _load_voc, tuple(VOC_CLASSES), ("bird", "cat", "cow", "dog", "horse", "sheep"), _224))
register_task(TaskSpec("cub200", "CUB-200-2011 birds cropped by box; 200 classes", _load_cub, None, None, _224))
register_task(TaskSpec("mix-cub", "CUB-200-2011 + Stanford Dogs (320 classes); target: the 200 birds",
                   _load_mix, None, _cub_classes, _224))
register_task(TaskSpec("mix-dogs", "CUB-200-2011 + Stanford Dogs (320 classes); target: the 120 dogs",
                   _load_mix, None, _dog_classes, _224))
register_task(TaskSpec("imagefolder", "any folder tree <class>/<image> (optionally train/, test/ and val/); choose classes with --classes",
                   _load_imagefolder, None, None, _224))
