"""Pieces of the worker loop that need no Ray: schedule, refresh timing, views, model, kNN."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trainers.augment import digits_augment, two_views
from trainers.evaluate import embed, knn_accuracy
from trainers.loop import lr_at
from trainers.models import SiameseNet, build_model, load_weights, save_weights


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0.0, 1.0, 2.0, 10.0) == 0.0
    assert lr_at(1.0, 1.0, 2.0, 10.0) == pytest.approx(0.5)
    assert lr_at(2.0, 1.0, 2.0, 10.0) == pytest.approx(1.0)
    assert lr_at(6.0, 1.0, 2.0, 10.0) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_at(10.0, 1.0, 2.0, 10.0) == pytest.approx(0.0, abs=1e-12)  # cos(pi) rounds to -1 exactly
    assert lr_at(3.0, 1.0, 0.0, 10.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_two_views_differ_per_sample_and_keep_shape():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    a, b = two_views(x, digits_augment(8))
    assert a.shape == b.shape == x.shape
    assert not torch.allclose(a, b)
    # views are drawn per sample: two identical inputs still get different views
    same = x[:1].repeat(4, 1, 1, 1)
    va, _ = two_views(same, digits_augment(8))
    assert not torch.allclose(va[0], va[1])
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_model_shapes_and_weight_roundtrip(tmp_path):
    cfg = {"width": 8, "embed_dim": 16, "proj_hidden": 32, "proj_dim": 12}
    torch.manual_seed(1)
    model = build_model(cfg, in_channels=1)
    h, z = model(torch.rand(5, 1, 8, 8))
    assert h.shape == (5, 16) and z.shape == (5, 12)
    save_weights(model, tmp_path / "m.pt")
    other = load_weights(build_model(cfg, in_channels=1), tmp_path / "m.pt")
    model.eval(), other.eval()
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model(x)[1], other(x)[1])


def test_knn_accuracy_hand_case():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.2, 1.0]]), dim=1)
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1, 1]), k=2) == 1.0
    assert knn_accuracy(train, labels, test, torch.tensor([1, 1, 1]), k=2) == pytest.approx(2 / 3)
    # k = all: the temperature-weighted vote still follows the closest class
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1, 1]), k=4, temperature=0.05) == 1.0


def test_embed_is_normalised_and_in_eval_mode():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = SiameseNet(width=4, embed_dim=6, proj_hidden=8, proj_dim=5)
    model.train()
    out = embed(model, rng.random((7, 1, 8, 8), dtype=np.float32), batch_size=3)
    assert out.shape == (7, 6)
    # a float32 norm of a normalised 6-vector is within (6 + 4) eps32 / 2 of 1
    assert torch.allclose(out.norm(dim=1), torch.ones(7), rtol=0, atol=10 * torch.finfo(torch.float32).eps)
    assert model.training  # restored
    # eval mode: the same sample embeds identically whatever batch it is in. In float64, so that kernels
    # chosen per batch size differ by sum(fan-in) eps64 ~ 3e-14, not float32's ~1e-5 (batch statistics
    # of train mode would move it by ~0.05)
    model.double()
    x = rng.random((4, 1, 8, 8))
    assert torch.allclose(embed(model, x, batch_size=4)[:1], embed(model, x[:1]), rtol=0, atol=1e-12)


def test_best_encoder_keeps_the_best_epoch_and_remembers_it_across_restarts(tmp_path):
    from trainers.loop import BestEncoder

    torch.manual_seed(0)
    spec = {"width": 4, "embed_dim": 8, "proj_hidden": 8, "proj_dim": 4}
    first, second = build_model(spec, 1), build_model(spec, 1)
    best = BestEncoder(str(tmp_path / "best"))
    assert best.offer(first, {"eval/knn_acc": 0.5, "train/loss": 1.0}, epoch=0, step=10)
    assert not best.offer(second, {"eval/knn_acc": 0.4}, epoch=1, step=20)  # worse: the first stays
    assert not best.offer(second, {"eval/knn_acc": float("nan")}, epoch=1, step=20)
    assert not best.offer(second, {"train/loss": 0.1}, epoch=1, step=20)  # nothing to judge by
    restarted = BestEncoder(str(tmp_path / "best"))  # a worker-group restart reads the best back
    assert restarted.value == 0.5 and not restarted.offer(second, {"eval/knn_acc": 0.45}, epoch=2, step=30)
    loaded = build_model(spec, 1)
    load_weights(loaded, tmp_path / "best" / "model.pt")
    for a, b in zip(loaded.state_dict().values(), first.state_dict().values()):
        assert torch.equal(a, b)
    # the classifier is judged by its accuracy, not by the kNN monitor it also reports
    assert restarted.offer(second, {"eval/knn_acc": 0.1, "eval/accuracy": 0.6}, epoch=3, step=40)
    meta = json.loads((tmp_path / "best" / "meta.json").read_text())
    assert meta == {"epoch": 3, "step": 40, "metric": "eval/accuracy", "value": 0.6}
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["meta.json", "model.pt"]  # no temp files


def test_disk_use_adds_up_the_run_directory_by_part(tmp_path):
    from pipelines.run import disk_use

    for name, size in (("train/epoch_0000/model.pt", 1000), ("train/epoch_0001/model.pt", 1000),
                       ("graphs/v0001.npz", 300), ("graphs/v0001.json", 20), ("metrics.jsonl", 7)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    use = disk_use(tmp_path)
    assert use["checkpoints"] == 2000 and use["graph versions"] == 320 and use["other"] == 7
    assert sum(use.values()) == 2327 and use["weight snapshots"] == 0
