"""Task registry: deterministic splits, dataset layouts made in fixtures, clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from refiner.data.datasets import ImageDataset

from refiner.data.samples import Preprocess
from refiner.data.tasks import CIFAR10_CLASSES, SplitOptions, _target_classes, get_task, load_task
from refiner.errors import ConfigError, DataError, DataLayoutError


def _png(path, size=(20, 16), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def _ids(samples):
    return {s.ident() for s in samples}


def test_digits_splits_are_deterministic_and_disjoint():
    a = load_task("digits", None, target=False)
    b = load_task("digits", None, target=False)
    assert [s.ident() for s in a.train] == [s.ident() for s in b.train]
    assert not (_ids(a.train) & _ids(a.val)) and not (_ids(a.train) & _ids(a.test)) and not (_ids(a.val) & _ids(a.test))
    assert a.classes == [str(i) for i in range(10)]
    target = load_task("digits", None, target=True)
    assert target.classes == list("012345") and {s.label for s in target.test} == set("012345")
    half_a = load_task("digits", None, target=False, options=SplitOptions(subset="half-a"))
    half_b = load_task("digits", None, target=False, options=SplitOptions(subset="half-b"))
    assert not (_ids(half_a.train) & _ids(half_b.train))
    assert _ids(half_a.train) | _ids(half_b.train) == _ids(a.train)
    few = load_task("digits", None, target=False, options=SplitOptions(train_per_class=5))
    assert len(few.train) == 50
    assert len(few.val) == 10 and _ids(few.val) <= _ids(a.val)  # val shrinks with the kept training data, still disjoint
    many = load_task("digits", None, target=False, options=SplitOptions(train_per_class=90))
    assert len(many.val) == 100 and not (_ids(many.val) & _ids(many.train))


def test_dataset_preprocessing():
    data = load_task("digits", None, target=True)
    ds = ImageDataset(data.test, data.classes, Preprocess(input_size=(3, 16, 16), mean=(0.3,) * 3, std=(0.37,) * 3))
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and 0 <= y < 6


def test_cifar10_layout(tmp_path):
    root = tmp_path / "cifar10"
    for split in ("train", "test"):
        for i, c in enumerate(CIFAR10_CLASSES):
            for j in range(3):
                _png(root / split / c / f"{j:04d}.jpg", (32, 32), i * 20)
    data = load_task("cifar-animal", tmp_path, target=True)
    assert data.classes == ["bird", "cat", "deer", "dog", "frog", "horse"]
    assert len(data.test) == 18 and len(data.val) == 6 and len(data.train) == 12
    (root / "test" / "frog").rename(root / "test" / "frogs")
    with pytest.raises(DataLayoutError, match="test/frog/"):
        load_task("cifar10", tmp_path, target=False)


def test_voc_layout_crops_boxes(tmp_path):
    root = tmp_path / "VOC2012"
    for image_set, ids in (("train", ["a", "b"]), ("val", ["c"])):
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(ids))
        for i in ids:
            _png(root / "JPEGImages" / f"{i}.jpg", (50, 40))
            objs = "".join(
                f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>5</xmin><ymin>6</ymin><xmax>25</xmax><ymax>30</ymax></bndbox></object>"
                for name in ("cat", "dog", "car", "bird", "cow", "horse", "sheep")
            )
            (root / "Annotations").mkdir(exist_ok=True)
            (root / "Annotations" / f"{i}.xml").write_text(f"<annotation>{objs}</annotation>")
    data = load_task("voc-animal", tmp_path, target=True)
    assert set(data.classes) == {"bird", "cat", "cow", "dog", "horse", "sheep"}
    assert data.test[0].load().size == (21, 25)
    with pytest.raises(DataError, match=r"classes \['aeroplane'"):
        load_task("voc-animal", tmp_path, target=False)


def test_cub_layout(tmp_path):
    root = tmp_path / "CUB_200_2011"
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "bounding_boxes.txt": []}
    for i in range(1, 9):
        cls = 1 + i % 2
        rel = f"{cls:03d}.Bird_{cls}/img_{i}.jpg"
        _png(root / "images" / rel, (40, 40))
        lines["images.txt"].append(f"{i} {rel}")
        lines["image_class_labels.txt"].append(f"{i} {cls}")
        lines["train_test_split.txt"].append(f"{i} {int(i <= 6)}")
        lines["bounding_boxes.txt"].append(f"{i} 2.0 3.0 10.0 12.0")
    for name, content in lines.items():
        (root / name).write_text("\n".join(content))
    (root / "classes.txt").write_text("1 001.Bird_1\n2 002.Bird_2\n")
    data = load_task("cub200", tmp_path, target=True)
    assert data.classes == ["001.Bird_1", "002.Bird_2"]
    assert data.train[0].load().size == (10, 12)
    (root / "bounding_boxes.txt").unlink()
    with pytest.raises(DataLayoutError, match="bounding_boxes.txt"):
        load_task("cub200", tmp_path, target=True)


def test_imagefolder_and_errors(tmp_path):
    for c in ("x", "y", "z"):
        for j in range(6):
            _png(tmp_path / "imgs" / c / f"{j}.png")
    data = load_task("imagefolder", tmp_path / "imgs", target=True, classes=["x", "z"])
    assert data.classes == ["x", "z"] and {s.label for s in data.test} == {"x", "z"}
    with pytest.raises(DataError, match=r"classes \['w'\] are not in"):
        load_task("imagefolder", tmp_path / "imgs", target=True, classes=["w"])
    with pytest.raises(ConfigError, match="unknown task 'voc'; valid tasks:"):
        load_task("voc", tmp_path, target=True)
    with pytest.raises(ConfigError, match="pass --data DIR"):
        load_task("cifar10", None, target=True)
    with pytest.raises(DataLayoutError, match="does not exist"):
        load_task("cifar10", tmp_path / "missing", target=True)


def test_mix_layout_splits_birds_and_dogs(tmp_path):
    from scipy.io import savemat

    cub = tmp_path / "CUB_200_2011"
    rows = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "bounding_boxes.txt": []}
    for i in range(1, 7):
        rel = f"001.Bird/img_{i}.jpg"
        _png(cub / "images" / rel, (30, 30))
        rows["images.txt"].append(f"{i} {rel}")
        rows["image_class_labels.txt"].append(f"{i} 1")
        rows["train_test_split.txt"].append(f"{i} {int(i <= 4)}")
        rows["bounding_boxes.txt"].append(f"{i} 0 0 10 10")
    for name, content in rows.items():
        (cub / name).write_text("\n".join(content))
    (cub / "classes.txt").write_text("1 001.Bird\n")
    dogs = tmp_path / "StanfordDogs"
    lists = {"train": [], "test": []}
    for i in range(6):
        rel = f"n02085620-Chihuahua/n02085620_{i}.jpg"
        _png(dogs / "Images" / rel, (30, 30))
        (dogs / "Annotation" / "n02085620-Chihuahua").mkdir(parents=True, exist_ok=True)
        (dogs / "Annotation" / rel.removesuffix(".jpg")).write_text(
            "<annotation><object><name>Chihuahua</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>21</xmax><ymax>12</ymax></bndbox></object></annotation>"
        )
        lists["train" if i < 4 else "test"].append(rel)
    for split, files in lists.items():
        cells = np.empty((len(files), 1), dtype=object)  # the layout of the official file lists
        for j, rel in enumerate(files):
            cells[j, 0] = np.array([rel])
        savemat(dogs / f"{split}_list.mat", {"file_list": cells})
    base = load_task("mix-cub", tmp_path, target=False)
    assert base.classes == ["001.Bird", "n02085620-Chihuahua"]
    assert load_task("mix-cub", tmp_path, target=True).classes == ["001.Bird"]
    dogs_task = load_task("mix-dogs", tmp_path, target=True)
    assert dogs_task.classes == ["n02085620-Chihuahua"]
    assert dogs_task.test[0].load().size == (20, 10)


def test_imbalanced_base_data_over_represents_non_target_classes():
    """--imbalance R keeps 1/R of each target class's images; the other classes keep all theirs (base nets only)."""
    plain = load_task("digits", None, target=False)
    skewed = load_task("digits", None, target=False, options=SplitOptions(imbalance=4))

    def counts(samples):
        return {c: sum(s.label == c for s in samples) for c in plain.classes}

    for split in ("train", "val"):
        before, after = counts(plain.split(split)), counts(skewed.split(split))
        for c in plain.classes:
            assert after[c] == (max(1, round(before[c] / 4)) if c in "012345" else before[c])
    def same(a, b):
        return len(a) == len(b) and all(x.label == y.label and (x.array == y.array).all() for x, y in zip(a, b))

    assert same(skewed.test, plain.test)  # test data stay as they are
    assert same(load_task("digits", None, target=True, options=SplitOptions(imbalance=4)).train, load_task("digits", None, target=True).train)
    with pytest.raises(ConfigError, match="targets all its classes"):
        _target_classes(get_task("cifar10"), CIFAR10_CLASSES)


def test_corrupt_images_are_named_or_skipped(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(20):
            Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "cat" / "9.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    data = load_task("imagefolder", tmp_path, target=True, classes=["cat", "dog"])
    bad = next(s for split in ("train", "val", "test") for s in data.split(split) if s.path.name == "9.jpg")
    with pytest.raises(DataError, match=r"cannot read image '.*9.jpg' \(.*\); replace or delete it, or pass --skip-bad-images"):
        bad.load()
    with pytest.warns(UserWarning, match=r"left out 1 unreadable images of the \w+ split, e.g. '.*9.jpg'"):
        clean = load_task("imagefolder", tmp_path, target=True, classes=["cat", "dog"], options=SplitOptions(skip_bad_images=True))
    names = [s.path.name for split in ("train", "val", "test") for s in clean.split(split)]
    assert "9.jpg" not in names and len(names) == 40


def test_validation_from_a_val_folder_or_half_of_test(tmp_path):
    """Issue 17, 5: imagefolder's val/ is the validation split when present; --val-from test halves test, disjointly."""
    for split, n in (("train", 8), ("test", 7), ("val", 3)):
        for c in ("x", "y"):
            for j in range(n):
                _png(tmp_path / "imgs" / split / c / f"{j}.png", value=j)
    data = load_task("imagefolder", tmp_path / "imgs", target=True)
    assert data.val_from == "val" and len(data.train) == 16 and len(data.test) == 14
    assert {s.path.parent.parent.name for s in data.val} == {"val"} and len(data.val) == 6
    halves = load_task("imagefolder", tmp_path / "imgs", target=True, options=SplitOptions(val_from="test"))
    assert halves.val_from == "test" and len(halves.train) == 16
    assert not _ids(halves.val) & _ids(halves.test) and _ids(halves.val) | _ids(halves.test) == _ids(data.test)
    assert sorted(s.label for s in halves.val) == ["x"] * 4 + ["y"] * 4  # stratified: half of each class (7 -> 4 + 3)
    again = load_task("imagefolder", tmp_path / "imgs", target=True, options=SplitOptions(val_from="test"))
    assert [s.ident() for s in again.test] == [s.ident() for s in halves.test]  # seeded
    carved = load_task("imagefolder", tmp_path / "imgs", target=True, options=SplitOptions(val_from="train"))
    assert carved.val_from == "train" and _ids(carved.val) <= _ids(data.train) and len(carved.test) == 14
    shutil.rmtree(tmp_path / "imgs" / "val")
    assert load_task("imagefolder", tmp_path / "imgs", target=True).val_from == "train"
    with pytest.raises(DataLayoutError, match="--val-from val: task 'imagefolder' found no validation folder"):
        load_task("imagefolder", tmp_path / "imgs", target=True, options=SplitOptions(val_from="val"))
    digits = load_task("digits", None, target=True, options=SplitOptions(val_from="test"))
    assert digits.val_from == "test" and not _ids(digits.val) & _ids(digits.test)


def test_overlap_warning_names_both_options():
    data = load_task("digits", None, target=True)
    assert data.overlap_warning([0.95, 0.97], [0.80, 0.82], "x_B") is None  # 15 points: not above the threshold
    text = data.overlap_warning([0.95, 0.97], [0.42, 0.44], "x_B")
    assert "x_B's mean validation accuracy (96.0 %) is 53.0 points above its test accuracy (43.0 %)" in text
    assert "carved from the training data" in text and "DIR/val/<class>/" in text and "--val-from test" in text
    halves = load_task("digits", None, target=True, options=SplitOptions(val_from="test"))
    assert halves.overlap_warning([0.95], [0.42], "x_B") is None  # two halves of one test split cannot overlap training

