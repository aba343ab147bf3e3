"""The feed without Ray: seeded views whatever the worker count, prefetch bounds, corrupt samples,
augmentation presets on uint8, and the chunked evaluation against its dense definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.store import SampleStore
from pipelines.synthetic import encode, render
from trainers.augment import build_augment, natural_augment, to_float
from trainers.evaluate import knn_accuracy, uniformity
from trainers.feed import BatchMaker, Feed, batch_seed


def _image_store(n: int = 24, corrupt: tuple[int, ...] = (5,)) -> SampleStore:
    blobs = [encode(render(0, i % 3, i, 3, 20 + i % 5, 24)) for i in range(n)]
    for i in corrupt:
        blobs[i] = b"garbage"
    return SampleStore.in_memory(encoded=blobs, label=np.arange(n) % 3, shard_size=7, image_size=16)


class _Plans:
    """A stand-in for the sampler client: a fixed plan per step, recording what was asked."""

    def __init__(self, n: int, batch: int):
        self.n, self.batch, self.asked = n, batch, []

    def __call__(self, step: int, horizon=None):
        self.asked.append(step)
        return (np.arange(step * self.batch, (step + 1) * self.batch) % self.n), 7


def test_views_are_a_function_of_seed_rank_and_step_not_of_workers():
    store = _image_store()
    maker = BatchMaker(store.codec, views=2, augment={"preset": "natural", "size": 16, "channels": 3, "blur": True})
    batches = {}
    for workers in (0, 2):
        feed = Feed(store, maker, _Plans(store.size, 6), workers=workers, depth=3, seed=11, rank=1, say=lambda s: None)
        try:
            batches[workers] = [feed.next(step, end=4)[0] for step in range(4)]
        finally:
            feed.close()
    for inline, pooled in zip(batches[0], batches[2]):
        for a, b in zip(inline["views"], pooled["views"]):
            assert a.dtype == torch.uint8 and a.shape == (6, 3, 16, 16)
            assert torch.equal(a, b)
    first = batches[0][0]["views"]
    assert not torch.equal(first[0], first[1])  # two different views of the same samples
    assert batch_seed(11, 1, 0) != batch_seed(11, 0, 0) != batch_seed(11, 1, 1)


def test_prefetch_runs_ahead_but_never_past_the_horizon():
    store = _image_store(corrupt=())
    plans = _Plans(store.size, 4)
    feed = Feed(store, BatchMaker(store.codec, views=1), plans, workers=0, depth=4, say=lambda s: None)
    batch, version = feed.next(0, horizon=3)
    assert plans.asked == [0, 1, 2] and version == 7  # not 3: a sync refresh is due there
    feed.next(1, horizon=3)
    feed.next(2, horizon=3)
    assert plans.asked == [0, 1, 2]
    feed.next(3, end=5)
    assert plans.asked == [0, 1, 2, 3, 4]  # ahead again, up to the end of training
    assert batch["views"][0].shape == (4, 3, 16, 16)


def test_a_corrupt_sample_is_replaced_counted_and_named_once():
    store = _image_store(corrupt=(5,))
    said = []
    feed = Feed(store, BatchMaker(store.codec, views=1, labels=True), _Plans(store.size, 8), workers=0,
                say=said.append)
    batch, _ = feed.next(0)
    assert feed.skipped == 1 and len(said) == 1 and "item[5]" in said[0] and "sample 5" in said[0]
    views = batch["views"][0]
    assert torch.equal(views[5], views[6])  # the next sample of the batch that decodes
    assert batch["label"].tolist() == (np.arange(8) % 3).tolist()
    feed.next(3)  # ids 24.. wrap to 0..7 again: counted again, not named again
    assert feed.skipped == 2 and len(said) == 1


def test_presets_on_uint8_keep_shapes_and_dtypes():
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    out = natural_augment(32, blur=True)(x)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    digits = build_augment("digits", 8)(torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8))
    assert digits.dtype == torch.float32 and 0.0 <= float(digits.min()) and float(digits.max()) <= 1.0
    grey = natural_augment(16, channels=1)(torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8))
    assert grey.shape == (1, 16, 16)
    assert torch.allclose(to_float(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="augment.preset must be one of digits, natural"):
        build_augment("imagenet", 8)


def test_crop_min_bounds_the_crop():
    """``augment.crop_min = 1``: every crop is the whole image, so a grey view (no colour steps) is the
    image or its mirror; the default (SimCLR's 0.08) crops and resizes."""
    x = torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8)
    whole = build_augment("natural", 16, channels=1, crop_min=1.0)
    torch.manual_seed(0)
    views = [whole(x) for _ in range(8)]
    assert all(torch.equal(v, x) or torch.equal(v, x.flip(-1)) for v in views)
    assert any(torch.equal(v, x) for v in views) and any(torch.equal(v, x.flip(-1)) for v in views)
    default = build_augment("natural", 16, channels=1)
    assert not all(torch.equal(v, x) or torch.equal(v, x.flip(-1)) for v in (default(x) for _ in range(8)))
    from pipelines.config import ConfigError, load_config

    from trainers.augment import CROP_MIN

    assert load_config(None, []).augment.crop_min == CROP_MIN  # the config's default is the transform's
    assert load_config(None, ["augment.crop_min=0.35"]).augment.crop_min == 0.35
    with pytest.raises(ConfigError, match="augment.crop_min"):
        load_config(None, ["augment.crop_min=0"])


def test_chunked_knn_equals_the_dense_vote():
    rng = np.random.default_rng(0)
    train = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(300, 8))), dim=1)
    test = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(70, 8))), dim=1)
    train_y, test_y = torch.tensor(rng.integers(0, 4, 300)), torch.tensor(rng.integers(0, 4, 70))
    sims = test @ train.T  # the dense definition
    top_sim, top_idx = sims.topk(15, dim=1)
    votes = torch.zeros(70, 4, dtype=sims.dtype).scatter_add_(1, train_y[top_idx], (top_sim / 0.1).exp())
    dense = float((votes.argmax(1) == test_y).double().mean())
    for chunk in (7, 64, 1024):
        assert knn_accuracy(train, train_y, test, test_y, k=15, temperature=0.1, chunk=chunk) == pytest.approx(dense)


def test_blockwise_uniformity_equals_all_pairs():
    z = torch.nn.functional.normalize(torch.randn(50, 6, generator=torch.Generator().manual_seed(1)), dim=1)
    d2 = torch.pdist(z.double()).pow(2)
    expected = math.log(torch.exp(-2 * d2).mean().item())
    for chunk in (7, 50, 4096):
        assert uniformity(z, chunk=chunk) == pytest.approx(expected, rel=1e-9)
