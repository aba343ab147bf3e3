"""The SampleStore built through Ray Data on one module-scoped local Ray: image folders (local and
s3:// on a real moto server) and parquet tensors, in the object store and on disk, read back exactly
from other processes; the refresher's streamed embedding of an image store."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipelines.datasets import build_stores, prepare_data
from pipelines.embed import embed_store
from pipelines.synthetic import image_folder, parquet_images
from trainers.models import build_model, save_weights


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with a labelled image folder; its keys are set in this (the driver's)
    environment only: the session's Ray workers get them with the source."""
    from _s3 import CREDENTIALS, moto_s3

    root = tmp_path_factory.mktemp("s3data")
    made = image_folder(root / "imgs", num_classes=3, per_class=7, size=(14, 20), formats=("png", "jpg"), seed=8)
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    with moto_s3() as server:
        server.upload_dir(root / "imgs", "bucket/imgs")
        yield server, root / "imgs", made
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def ray_env(s3, ray_local):
    return ray_local


def _read_everywhere(ray_env, store, ids):
    @ray_env.remote(num_cpus=0)
    def far(s, wanted):
        return [bytes(b) for b in s.raw(wanted)]

    here = [bytes(b) for b in store.raw(ids)]
    assert ray_env.get(far.remote(store, ids)) == here  # another process maps the same shards
    return here


@pytest.mark.parametrize("location", ["object_store", "disk"])
def test_image_store_holds_the_exact_file_bytes(ray_env, tmp_path, s3, location):
    _, root, made = s3
    prepared = prepare_data({"source": f"images:{root}", "test_fraction": 0.25, "image_size": 16},
                            {"max_samples": 100}, tmp_path)
    splits = build_stores(prepared, location, tmp_path / "store")
    assert splits.info["location"] == location and splits.train.size == 15 and splits.test.size == 6
    locations = prepared.listings["train"].table.column("location").to_pylist()
    ids = np.random.default_rng(1).permutation(15)
    assert _read_everywhere(ray_env, splits.train, ids) == [(root / locations[i]).read_bytes() for i in ids]
    labels = {rel: y for rel, y in zip(made.files[""], made.labels[""])}
    assert splits.train.labels.tolist() == [labels[loc] for loc in locations]
    assert splits.train.sample_shape == (3, 16, 16) and splits.train.take(ids[:3]).shape == (3, 3, 16, 16)
    if location == "disk":
        again = build_stores(prepared, location, tmp_path / "store")  # a resumed run reuses complete shards
        assert again.info["reused"] and [bytes(b) for b in again.train.raw(ids)] == \
            [bytes(b) for b in splits.train.raw(ids)]


def test_s3_image_store_matches_the_local_one(ray_env, tmp_path, s3):
    server, root, _ = s3
    remote = build_stores(prepare_data({"source": "images:s3://bucket/imgs", "s3_endpoint": server.endpoint,
                                        "split_seed": 3}, {"max_samples": 100}, None), "object_store")
    local = build_stores(prepare_data({"source": f"images:{root}", "split_seed": 3}, {"max_samples": 100}, None),
                         "object_store")
    ids = np.arange(remote.train.size)[::-1]
    assert _read_everywhere(ray_env, remote.train, ids) == [bytes(b) for b in local.train.raw(ids)]
    assert np.array_equal(remote.test.labels, local.test.labels)


def test_parquet_tensor_store_keeps_uint8_pixels(ray_env, tmp_path):
    parquet_images(tmp_path / "t", num_rows=40, files=2, encoding="tensor", size=8, row_group_size=6, seed=4)
    prepared = prepare_data({"source": f"parquet:{tmp_path / 't'}", "label_column": "label", "test_fraction": 0.25},
                            {"max_samples": 100}, None)
    splits = build_stores(prepared, "object_store")
    import pyarrow.parquet as pq

    pixels = pq.read_table(tmp_path / "t").column("image").combine_chunks().to_numpy_ndarray()
    rows = splits.train_source_ids
    ids = np.array([29, 0, 7])
    got = np.stack([np.frombuffer(b, np.uint8).reshape(3, 8, 8) for b in splits.train.raw(ids)])
    assert np.array_equal(got, pixels[rows[ids]].transpose(0, 3, 1, 2))
    assert splits.train.codec["dtype"] == "uint8" and splits.info["stored_bytes"] < 40 * 3 * 64 * 2


def test_streamed_embedding_of_an_image_store_matches_a_direct_pass(ray_env, tmp_path, s3):
    _, root, _ = s3
    splits = build_stores(prepare_data({"source": f"images:{root}", "image_size": 16}, {"max_samples": 100}, None),
                          "object_store")
    cfg = {"width": 8, "embed_dim": 16, "proj_hidden": 32, "proj_dim": 8}
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3)
    save_weights(model, tmp_path / "model.pt")
    ids = np.array([3, 9, 1, 14, 0])
    emb = embed_store(splits.train, str(tmp_path), cfg, ids, pool_size=1, num_cpus=0.25, batch_size=2)
    model.eval()
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model(torch.from_numpy(splits.train.take(ids)))[1], dim=1).numpy()
    assert emb.shape == (5, 8)
    np.testing.assert_allclose(emb, direct, atol=1e-5)
