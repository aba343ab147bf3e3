"""Every loss trains through its task without Ray: finite, falling loss; task-specific state and metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.config import load_config
from pipelines.datasets import SampleStore
from pipelines.sources import gaussian_pairs, load_source, split_indices
from trainers.losses import LOSSES
from trainers.models import network_spec, unwrap
from trainers.feed import step_seed
from trainers.tasks import TARGET_FILE, EMATask, build_task

MODEL = {"width": 8, "embed_dim": 32, "proj_hidden": 64, "proj_dim": 16}


def _stores(source: str):
    raw = load_source(source) if source != "generated:gaussian" else gaussian_pairs(1200, dim=4, seed=1)
    train_idx, test_idx = split_indices(len(raw.x), 0.2, 0, raw.labels)

    def store(idx):
        cols = {"x": raw.x[idx], "label": None if raw.labels is None else raw.labels[idx],
                "v": None if raw.v is None else raw.v[idx]}
        return SampleStore.in_memory(**cols)

    return store(train_idx), store(test_idx)


def _task(loss: str, train, hyper: dict, options=None):
    config = load_config(None, [f"loss.name={loss}", *(
        ["data.source=builtin:digits_pairs"] if loss in ("clip", "conditional", "joint") else [])])
    kind = config.loss.kind
    v_shape = train.column("v").shape[1:] if kind == "bimodal" else None
    num_classes = 10 if kind == "classifier" else None
    spec = network_spec(kind, MODEL, train.sample_shape, v_shape, num_classes)
    if kind == "classifier" and "noise" not in hyper:
        counts = np.bincount(train.column("label"), minlength=10)
        hyper = {**hyper, "noise": (counts / counts.sum()).tolist()}
    return build_task(spec, LOSSES[loss](**hyper), options)


def _train(task, train, steps: int = 40, batch: int = 64, lr: float = 3e-3, seed: int = 0):
    torch.manual_seed(seed)
    model = task.build()
    task.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        ids = rng.choice(train.size, batch, replace=False)
        loss, extras = task.step_loss(model, train, ids, torch.device("cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        task.after_step(model, (step + 1) / steps)
        assert all(math.isfinite(v) for v in extras.values())
        losses.append(loss.item())
    return model, losses, extras


CASES = [
    ("infonce", "builtin:digits", {"temperature": 0.2}, None),
    ("sscl", "builtin:digits", {"temperature": 0.2, "n_hard": 32, "n_synthetic": 16}, None),
    ("mveb", "builtin:digits", {"lam": 0.01}, {"ema_base": 0.99}),
    ("soft_infonce", "builtin:digits", {"smoothing": 0.1}, {"targets": "smoothing"}),
    ("soft_infonce", "builtin:digits", {"smoothing": 0.1}, {"targets": "mixup", "mixup_alpha": 0.8}),
    ("clip", "builtin:digits_pairs", {"temperature": 0.1}, None),
    ("conditional", "builtin:digits_pairs", {"temperature": 0.1}, None),
    ("joint", "builtin:digits_pairs", {"temperature": 0.1}, None),
    ("clip", "generated:gaussian", {"temperature": 0.1, "tilt": "l2"}, None),
]


@pytest.mark.parametrize("loss,source,hyper,options", CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_every_loss_trains_with_falling_loss(loss, source, hyper, options):
    train, test = _stores(source)
    task = _task(loss, train, hyper, options)
    model, losses, extras = _train(task, train)
    assert all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 0.02 * abs(first), (first, last)

    plans = np.arange(train.size - train.size % 64).reshape(-1, 64)[:4]
    metrics = task.evaluate(model, train, test, plans, final=False)
    assert "sampler/hardness" in metrics and all(math.isfinite(v) for v in metrics.values())
    if task.kind == "classifier":
        assert 0.0 <= metrics["eval/ece"] <= 1.0 and metrics["eval/accuracy"] > 0.2  # chance is 0.1
    if task.kind == "bimodal":
        assert {"eval/retrieval_acc", "eval/retrieval_acc_u"} <= set(metrics)
        if source == "builtin:digits_pairs":
            assert metrics["eval/retrieval_acc"] > 0.3  # classification among 10 labels; chance 0.1
    if task.kind == "ema":
        assert 0 < extras["mveb/kappa"] <= 10.0 and 0.99 <= extras["mveb/momentum"] <= 1.0


def _oracle_retrieval(u: np.ndarray, v: np.ndarray, cross: np.ndarray) -> float:
    """Top-1 v-from-u retrieval with the true conditional density log p(v | u) as the score."""
    precision = np.linalg.inv(np.eye(len(cross)) - cross.T @ cross)
    diff = v[None, :, :] - (u @ cross)[:, None, :]
    scores = -0.5 * np.einsum("ijk,kl,ijl->ij", diff, precision, diff)
    return float((scores.argmax(1) == np.arange(len(u))).mean())


def test_bimodal_retrieval_approaches_the_true_density_on_gaussian_pairs():
    train, test = _stores("generated:gaussian")
    task = _task("clip", train, {"temperature": 0.1})
    model, _, _ = _train(task, train, steps=150, batch=128)
    metrics = task.task_metrics(unwrap(model), train, test)
    cross = gaussian_pairs(1200, dim=4, seed=1).meta["cross_covariance"]
    oracle = _oracle_retrieval(test.column("x").astype(float), test.column("v").astype(float), cross)
    # 240 held-out candidates (chance 1/240); the Bayes-optimal score finds a few percent of them.
    assert oracle > 5 / test.size
    assert metrics["eval/retrieval_acc"] >= 0.5 * oracle and metrics["eval/retrieval_acc_u"] > 3 / test.size


def test_ema_target_follows_the_schedule_and_survives_a_checkpoint(tmp_path):
    train, _ = _stores("builtin:digits")
    task = _task("mveb", train, {"lam": 0.01}, {"ema_base": 0.9})
    torch.manual_seed(0)
    model = task.build()
    task.attach(model)
    before = [p.clone() for p in task.target.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    task.after_step(model, 0.0)  # progress 0: momentum = ema_base exactly
    assert task.momentum == pytest.approx(0.9)
    # float32: m p_t + (1 - m) p_o and this formula round by a few eps32 |p| (assert_close: rtol 1.3e-6,
    # atol 1e-5 for cancelling entries)
    for p_t, p_0, p_o in zip(task.target.parameters(), before, model.parameters()):
        torch.testing.assert_close(p_t, 0.9 * p_0 + 0.1 * p_o)
    task.after_step(model, 1.0)  # the end of training: momentum 1, the target stops moving
    assert task.momentum == pytest.approx(1.0)
    assert not any(p.requires_grad for p in task.target.parameters())

    task.save_state(tmp_path)
    other = _task("mveb", train, {"lam": 0.01}, {"ema_base": 0.9})
    other.attach(other.build())
    other.load_state(tmp_path)
    for a, b in zip(task.target.state_dict().values(), other.target.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError, match=TARGET_FILE):
        other.load_state(tmp_path / "nowhere")
    assert isinstance(other, EMATask)


def test_classifier_mixup_targets_mix_the_flipped_batch():
    train, _ = _stores("builtin:digits")
    seen = {}

    class Spy(LOSSES["soft_infonce"]):
        def forward(self, z_a, z_b=None, targets=None):
            seen["targets"] = targets
            return super().forward(z_a, z_b, targets)

    counts = np.bincount(train.column("label"), minlength=10)
    spec = network_spec("classifier", MODEL, train.sample_shape, num_classes=10)
    task = build_task(spec, Spy(smoothing=0.0, noise=(counts / counts.sum()).tolist()),
                      {"targets": "mixup", "mixup_alpha": 0.5})
    torch.manual_seed(0)
    ids = np.arange(8)
    task.step_loss(task.build(), train, ids, torch.device("cpu"))
    targets, labels = seen["targets"], torch.from_numpy(train.take(ids, "label"))
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    lam = targets[0, labels[0]] if labels[0] != labels[-1] else None
    if lam is not None:  # row i mixes its own label (lam) with the label of row N-1-i (1 - lam)
        torch.testing.assert_close(targets[-1, labels[-1]], lam)


def test_a_step_trained_again_draws_what_it_drew_the_first_time():
    """trainers.loop seeds torch's generator with ``step_seed(train.seed, rank, step)`` before each
    step's loss: SSCL's synthetic negatives (random mixing weights) are then a function of the step, so
    a step replayed after a restart computes the loss it computed before (tests/e2e/test_faults.py
    shows it for a whole run through its faults)."""
    train, _ = _stores("builtin:digits")
    task = _task("sscl", train, {"temperature": 0.2, "n_hard": 32, "n_synthetic": 16})
    torch.manual_seed(0)
    model = task.build()
    task.attach(model)
    ids = np.arange(64)

    def loss_of(step: int, rank: int) -> float:
        torch.manual_seed(step_seed(0, rank, step))
        with torch.no_grad():
            loss, _ = task.step_loss(model, train, ids, torch.device("cpu"))
        return loss.item()

    first = [loss_of(step, 0) for step in (5, 6)]
    assert [loss_of(step, 0) for step in (5, 6)] == first  # replayed: bit for bit
    assert first[0] != first[1] and loss_of(5, 1) != first[0]  # other steps, other ranks: other draws
