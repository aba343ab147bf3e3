"""The shapes benchmark (pipelines/shapes.py): the masks against hand-computed points and areas, the
images as a pure function of their seed, raw pixels near chance, and `hardbatch generate`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.cli import main
from pipelines.shapes import SHAPES, render_shape, shape_mask
from pipelines.synthetic import image_folder
from trainers.evaluate import knn_accuracy

GRID = np.linspace(-1.2, 1.2, 1201, dtype=np.float64)
U, V = np.meshgrid(GRID, GRID)  # v points down, as image rows do
CELL = (GRID[1] - GRID[0]) ** 2


def _lens(r1: float, r2: float, d: float) -> float:
    """The area where two discs of radii ``r1``, ``r2`` at distance ``d`` overlap (partly)."""
    return (r1 ** 2 * math.acos((d * d + r1 * r1 - r2 * r2) / (2 * d * r1))
            + r2 ** 2 * math.acos((d * d + r2 * r2 - r1 * r1) / (2 * d * r2))
            - 0.5 * math.sqrt((-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2)))


def _inside(name: str, u: float, v: float) -> bool:
    return bool(shape_mask(name, np.array([u]), np.array([v]))[0])


@pytest.mark.parametrize("name,inside,outside", [
    ("disc", [(0, 0), (0.85, 0)], [(0.95, 0), (0.7, 0.7)]),
    ("ring", [(0.8, 0), (0, -0.6)], [(0, 0), (0.3, 0.3), (1.05, 0)]),
    ("square", [(0.7, 0.7), (-0.7, 0.1)], [(0.75, 0), (0, -0.8)]),
    # one vertex straight up at (0, -1); the base at v = cos(60 deg) = 0.5
    ("triangle", [(0, -0.95), (0, 0.45), (0.7, 0.45)], [(0, 0.55), (0.3, -0.6), (-0.9, 0.45)]),
    # a vertex at angle 0 (radius 0.95); the apothem 0.95 cos(30 deg) = 0.823 straight up
    ("hexagon", [(0.93, 0), (0, -0.8)], [(0.97, 0), (0, -0.85)]),
    ("plus", [(0, 0.9), (-0.9, 0), (0.2, 0.2)], [(0.5, 0.5), (0, 0.97)]),
    ("x", [(0.6, 0.6), (-0.6, 0.6)], [(0, 0.9), (0.9, 0)]),
    # points at radius 1, one up; the inner corners at radius 0.45, 36 degrees from a point
    ("star", [(0, -0.95), (0.4 * math.sin(math.radians(36)), -0.4 * math.cos(math.radians(36)))],
     [(0, -1.05), (0.5 * math.sin(math.radians(36)), -0.5 * math.cos(math.radians(36)))]),
    ("crescent", [(-0.9, 0), (0, -0.9)], [(0.5, 0), (0, 0)]),
    ("tee", [(0, 0.8), (0.8, -0.65), (0, -0.65)], [(0.8, 0.5), (0, 0.95), (0.5, 0)]),
])
def test_each_shape_holds_and_excludes_hand_picked_points(name, inside, outside):
    assert all(_inside(name, u, v) for u, v in inside), [(p, _inside(name, *p)) for p in inside]
    assert not any(_inside(name, u, v) for u, v in outside), [(p, _inside(name, *p)) for p in outside]


@pytest.mark.parametrize("name,area", [
    ("disc", math.pi * 0.9 ** 2),
    ("ring", math.pi * (1 - 0.55 ** 2)),
    ("square", 1.44 ** 2),
    ("triangle", 3 * math.sqrt(3) / 4),  # equilateral, inscribed in the unit circle
    ("hexagon", 3 * math.sqrt(3) / 2 * 0.95 ** 2),
    ("plus", 2 * (0.5 * 1.9) - 0.5 ** 2),
    ("x", 2 * (0.5 * 1.9) - 0.5 ** 2),
    ("star", 10 * 0.5 * 1.0 * 0.45 * math.sin(math.radians(36))),  # 10 triangles centre-point-corner
    ("tee", 1.8 * 0.5 + 0.48 * (0.9 - (-0.65 + 0.25))),  # the bar, and the stem below it
    ("crescent", math.pi - _lens(1.0, 0.78, 0.5)),  # the unit disc less its overlap with the bite
])
def test_each_shape_has_the_area_of_its_formula(name, area):
    measured = shape_mask(name, U, V).sum() * CELL
    assert measured == pytest.approx(area, rel=0.01), (name, measured, area)


def test_images_are_a_pure_function_of_seed_class_and_index():
    a = render_shape(3, 4, 17, 10, 32, 32)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, render_shape(3, 4, 17, 10, 32, 32))
    assert not np.array_equal(a, render_shape(3, 4, 18, 10, 32, 32))
    assert not np.array_equal(a, render_shape(4, 4, 17, 10, 32, 32))
    assert render_shape(0, 1, 0, 10, 24, 40).shape == (24, 40, 3)
    with pytest.raises(ValueError, match="1 to 10 classes"):
        render_shape(0, 0, 0, 11, 32, 32)


def test_raw_pixels_tell_little_of_the_class():
    """The floor the benchmark is built for: a kNN on raw pixels stays near chance (0.1)."""
    def split(first: int, n: int):
        x = np.stack([render_shape(0, c, first + i, 10, 32, 32) for c in range(10) for i in range(n)])
        f = torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255)
        return f, torch.arange(10).repeat_interleave(n)

    (f_train, y_train), (f_test, y_test) = split(0, 60), split(10_000, 20)
    mean = f_train.mean(0)
    norm = torch.nn.functional.normalize
    accuracy = knn_accuracy(norm(f_train - mean, dim=1), y_train, norm(f_test - mean, dim=1), y_test)
    assert accuracy < 0.3, accuracy


def test_image_folder_of_shapes_holds_the_rendered_pixels(tmp_path):
    made = image_folder(tmp_path / "s", num_classes=3, per_class={"train": 2, "test": 1}, size=32, seed=5,
                        kind="shapes")
    assert made.classes == ["class_00", "class_01", "class_02"] and len(made.files["train"]) == 6
    with Image.open(tmp_path / "s" / made.files["train"][3]) as img:  # class_01, its second image
        pixels = np.asarray(img.convert("RGB"))
    assert np.array_equal(pixels, render_shape(5, 1, 1 * 2 + 1, 3, 32, 32))
    with pytest.raises(ValueError, match="kind: 'blobs'"):
        image_folder(tmp_path / "t", kind="blobs")
    with pytest.raises(ValueError, match="num_classes: 12"):
        image_folder(tmp_path / "t", num_classes=12, kind="shapes")
    assert not (tmp_path / "t").exists()


def test_generate_command_writes_the_set_and_refuses_bad_requests(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["generate", "shapes", str(out), "--train", "3", "--test", "1", "--classes", "4", "--seed", "2"]) == 0
    said = capsys.readouterr().out
    assert f"shapes: 12 train, 4 test images of 32x32, 4 classes, seed 2, in {out}" in said
    assert f"--set data.source=images:{out / 'train'} --set data.test_source=images:{out / 'test'}" in said
    assert len(list((out / "train").glob("class_0*/*.png"))) == 12 and len(list((out / "test").rglob("*.png"))) == 4

    for args, message in (([str(out)], f"{out}: exists and is not an empty folder"),
                          ([str(tmp_path / "a"), "--classes", "11"], "num_classes: 11"),
                          ([str(tmp_path / "b"), "--size", "4"], "--size 4: must be at least 8"),
                          ([str(tmp_path / "c"), "--train", "0"], "--train 0: must be at least 1")):
        assert main(["generate", "shapes", *args]) == 2
        assert message in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")


def test_the_benchmark_config_validates_on_a_generated_set(tmp_path, monkeypatch, capsys):
    """configs/shapes.yaml as its header says to use it: generate the set where you run, then run."""
    config = Path(__file__).resolve().parents[2] / "configs" / "shapes.yaml"
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "shapes", "shapes", "--train", "2", "--test", "1"]) == 0
    capsys.readouterr()
    assert main(["validate", str(config)]) == 0
    said = capsys.readouterr().out
    assert "data: images:shapes/train: found, labelled, 10 classes" in said, said
    assert "augment.crop_min = 0.35" in said and "model.width = 16" in said
