"""User data without Ray: image folders and parquet (local and on a real S3 server), the listing
and split, the SampleStore's exact bytes, and the one-line refusals of bad input."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.config import ConfigError, load_config
from pipelines.datasets import plan_shards, prepare_data
from pipelines.sources import IMAGE_EXTENSIONS, SourceError, make_source
from pipelines.store import SampleStore, Shard, shard_table, write_shard
from pipelines.synthetic import MODES, image_folder, parquet_images, render
from trainers.feed import decode_batch


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    labelled = image_folder(root / "labelled", num_classes=3, per_class={"train": 6, "test": 2}, size=(12, 30),
                            formats=("png", "jpg", "webp", "bmp"), modes=MODES, corrupt=1, seed=3)
    flat = image_folder(root / "flat", num_classes=2, per_class=5, size=16, labelled=False, seed=4)
    return root, labelled, flat


def test_generator_is_seeded_and_lays_out_classes(tmp_path, folders):
    root, labelled, flat = folders
    again = image_folder(tmp_path / "again", num_classes=3, per_class={"train": 6, "test": 2}, size=(12, 30),
                         formats=("png", "jpg", "webp", "bmp"), modes=MODES, corrupt=1, seed=3)
    assert again.files == labelled.files and again.corrupt == labelled.corrupt
    for rel in labelled.files["train"]:
        assert (again.root / rel).read_bytes() == (labelled.root / rel).read_bytes()
    assert labelled.classes == ["class_00", "class_01", "class_02"]
    assert all(rel.startswith(f"train/{labelled.classes[y]}/") for rel, y in zip(labelled.files["train"],
                                                                                 labelled.labels["train"]))
    assert len(labelled.corrupt) == 2 and all(f.endswith(IMAGE_EXTENSIONS) for f in labelled.corrupt)
    assert all("/" not in rel for rel in flat.files[""]) and (flat.labels[""] == -1).all()
    other = image_folder(tmp_path / "other", num_classes=3, per_class=2, size=16, seed=4)
    assert (other.root / other.files[""][0]).read_bytes() != (again.root / again.files["train"][0]).read_bytes()


def test_image_folder_labels_match_torchvision_image_folder(folders):
    from torchvision.datasets import ImageFolder

    root, labelled, _ = folders
    listing = make_source(f"images:{root / 'labelled' / 'train'}").list()
    reference = ImageFolder(str(root / "labelled" / "train"), loader=lambda path: path,
                            is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS))
    assert listing.classes == reference.classes
    got = [(str(root / "labelled" / "train" / loc), int(y)) for loc, y in
           zip(listing.table.column("location").to_pylist(), listing.labels)]
    assert got == [(path, y) for path, y in reference.samples]


def test_nested_folders_keep_image_folders_order(tmp_path):
    from torchvision.datasets import ImageFolder

    for rel in ("b/z.png", "b/a b/y.png", "b/a/x.PNG", "b/a-c/w.jpg", "a/q.webp", "a/.hidden.png", "_skip/s.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    listing = make_source(f"images:{tmp_path}").list()
    reference = ImageFolder(str(tmp_path), loader=lambda path: path,
                            is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS) and "/." not in p)
    assert listing.classes == ["a", "b"] == [c for c in reference.classes if not c.startswith("_")]
    assert [str(tmp_path / loc) for loc in listing.table.column("location").to_pylist()] == \
        [path for path, _ in reference.samples if "/_skip/" not in path]


def test_flat_folder_is_unlabelled_and_reads_exact_bytes(folders):
    root, _, flat = folders
    source = make_source(f"images:{root / 'flat'}")
    assert not source.probe().labelled
    listing = source.list()
    assert listing.classes is None and listing.labels is None and listing.size == 10
    rows = np.array([7, 0, 3])
    got = source.read(listing.table.take(rows)).x
    assert [bytes(b) for b in got] == [(root / "flat" / flat.files[""][r]).read_bytes() for r in rows]


def test_mixed_sizes_and_modes_decode_to_rgb_squares(folders):
    root, labelled, _ = folders
    source = make_source(f"images:{root / 'labelled' / 'train'}")
    listing = source.list()
    batch, failures = decode_batch(source.read(listing.table).x, {"kind": "image", "size": 16})
    assert batch.shape == (listing.size, 3, 16, 16) and batch.dtype.is_floating_point is False
    corrupt = [i for i, loc in enumerate(listing.table.column("location").to_pylist())
               if f"train/{loc}" in labelled.corrupt]
    assert [pos for pos, _ in failures] == corrupt and "not a decodable image" in failures[0][1]
    # replaced deterministically: by the next sample of the batch that decodes
    again, _ = decode_batch(source.read(listing.table).x, {"kind": "image", "size": 16})
    assert np.array_equal(batch.numpy(), again.numpy())
    assert np.array_equal(batch[corrupt[0]].numpy(), batch[(corrupt[0] + 1) % listing.size].numpy())


def test_prepare_splits_caps_and_writes_the_item_map(tmp_path, folders):
    root, _, _ = folders
    cfg = {"source": f"images:{root / 'labelled' / 'train'}", "test_fraction": 0.34, "split_seed": 1}
    prepared = prepare_data(cfg, {"max_samples": 3}, tmp_path)
    assert prepared.sizes == {"train": 11, "test": 3}  # 7 held out (ceil of 34 %), capped to 3
    assert 12 <= prepared.image_size <= 30  # the first image's shorter side
    train_locs = set(prepared.listings["train"].table.column("location").to_pylist())
    assert not train_locs & set(prepared.listings["test"].table.column("location").to_pylist())
    items = (tmp_path / "data" / "items_train.csv").read_text().splitlines()
    assert items[0].split(",")[:3] == ['"id"', '"source_row"', '"location"'] and len(items) == 12
    again = prepare_data(cfg, {"max_samples": 3}, tmp_path)  # a resumed run reads its item map back
    assert again.resumed and again.listings["train"].table.equals(prepared.listings["train"].table)
    separate = prepare_data({"source": f"images:{root / 'labelled' / 'train'}",
                             "test_source": f"images:{root / 'labelled' / 'test'}", "image_size": 20},
                            {"max_samples": 100}, None)
    assert separate.sizes == {"train": 18, "test": 6} and separate.image_size == 20
    assert separate.listings["test"].classes == separate.classes


def test_parquet_encoded_and_tensor_columns(tmp_path):
    made = parquet_images(tmp_path / "enc", num_rows=30, files=3, row_group_size=4, label_as="str", seed=2)
    source = make_source(f"parquet:{tmp_path / 'enc'}", label_column="label")
    listing = source.list()
    assert listing.size == 30 and listing.classes == ["class_00", "class_01", "class_02", "class_03"]
    assert listing.table.column("location").to_pylist() == made.files[""]
    rows = np.array([29, 0, 13, 5])
    table = pq.read_table(tmp_path / "enc")
    assert [bytes(b) for b in source.read(listing.table.take(rows)).x] == \
        [table.column("image")[int(r)].as_py() for r in rows]
    parquet_images(tmp_path / "t.parquet", num_rows=9, encoding="tensor", size=8, seed=5)
    tensors = make_source(f"parquet:{tmp_path / 't.parquet'}")
    listing = tensors.list()
    assert listing.codec == {"kind": "tensor", "shape": [3, 8, 8], "dtype": "uint8"} and listing.labels is None
    x = tensors.read(listing.table.take(np.array([4, 1]))).x
    assert np.array_equal(x[0], render(5, 0, 4, 4, 8, 8).transpose(2, 0, 1))
    glob = make_source(f"parquet:{tmp_path / 'enc'}/part-0000[12].parquet")
    assert glob.list().size == 20


def test_store_returns_exact_bytes_in_any_order_across_shards(tmp_path, folders):
    root, labelled, _ = folders
    files = labelled.files["train"]
    blobs = [(root / "labelled" / f).read_bytes() for f in files]
    mem = SampleStore.in_memory(encoded=blobs, shard_size=5, names=files, image_size=16)
    paths = []
    for a in range(0, len(blobs), 7):  # the same data as memory-mapped Arrow files
        path = str(tmp_path / f"s{a}.arrow")
        write_shard(shard_table(np.arange(a, min(a + 7, len(blobs))), blobs[a:a + 7], files[a:a + 7]), path)
        paths.append(Shard(a, min(a + 7, len(blobs)), path=path))
    disk = SampleStore(paths, None, None, {"kind": "image", "size": 16}, location="disk")
    ids = np.random.default_rng(0).permutation(len(blobs))
    ids = np.concatenate([ids, ids[:3]])  # repeats too
    for store in (mem, disk):
        assert [bytes(b) for b in store.raw(ids)] == [blobs[i] for i in ids]
        assert store.name(int(ids[0])) == files[ids[0]]
        assert store.take(ids[:4]).shape == (4, 3, 16, 16)
    with pytest.raises(IndexError, match=r"\[0, 18\)"):
        mem.raw(np.array([18]))


def test_store_keeps_uint8_tensors_and_plans_contiguous_shards():
    x = np.random.default_rng(1).integers(0, 256, size=(50, 3, 4, 4), dtype=np.uint8)
    store = SampleStore.in_memory(x, label=np.arange(50) % 5, shard_size=16)
    assert store.codec["dtype"] == "uint8" and store.sample_shape == (3, 4, 4)
    ids = np.array([49, 0, 17, 16, 33])
    assert [bytes(b) for b in store.raw(ids)] == [x[i].tobytes() for i in ids]
    np.testing.assert_allclose(store.take(ids), x[ids] / 255.0, atol=1e-7)
    bounds = plan_shards(np.full(1000, 3000), target=1 << 20, min_shards=1)
    assert bounds[0] == 0 and bounds[-1] == 1000 and np.all(np.diff(bounds) > 0) and len(bounds) == 4


@pytest.mark.parametrize("spec, options, fragment", [
    ("images:{root}/nowhere", {}, "folder not found"),
    ("images:{root}/labelled/train/class_00/class_00_000001.webp", {}, "is a file"),
    ("images:{root}/empty", {}, "the folder is empty"),
    ("images:{root}/texts", {}, "no images found (looked for .jpg, .jpeg, .png, .webp, .bmp"),
    ("images:{root}/hollow", {}, "class folder 'b' holds no images"),
    ("parquet:{root}/nowhere.parquet", {}, "no such file or folder"),
    ("parquet:{root}/p.parquet", {"image_column": "pixels"}, "is not a column of p.parquet (its columns: image, label)"),
    ("parquet:{root}/p.parquet", {"label_column": "class"}, "data.label_column = 'class' is not a column"),
    ("parquet:{root}/nulls.parquet", {"label_column": "label"}, "has 2 null value(s) (first at nulls.parquet#"),
    ("parquet:{root}/p.parquet", {"image_column": "label"}, "has type int64: expected encoded image bytes"),
])
def test_bad_input_is_one_line_naming_the_path(tmp_path, spec, options, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("x")
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    (tmp_path / "hollow" / "b").mkdir()
    image_folder(tmp_path / "hollow" / "a", num_classes=1, per_class=1, size=8, labelled=False)
    image_folder(tmp_path / "labelled" / "train", num_classes=1, per_class=2, size=8, formats=("webp",))
    parquet_images(tmp_path / "p.parquet", num_rows=4, size=8)
    parquet_images(tmp_path / "nulls.parquet", num_rows=8, size=8, null_labels=2)
    source = make_source(spec.format(root=tmp_path), **options)
    with pytest.raises(SourceError) as err:
        source.probe()
        source.list()
    message = str(err.value)
    assert fragment in message and "\n" not in message
    assert str(tmp_path) in message


def test_config_checks_the_data_before_ray(tmp_path, folders):
    root, _, _ = folders
    ok = load_config("configs/digits.yaml", [f"data.source=images:{root / 'labelled' / 'train'}"])
    assert ok.data.source.startswith("images:") and ok.augment.preset == "auto"
    cases = [
        ([f"data.source=images:{tmp_path / 'nope'}"], "folder not found"),
        ([f"data.source=images:{root / 'flat'}", "data.image_column=img"], "data.image_column applies to parquet"),
        ([f"data.source=images:{root / 'flat'}", f"data.test_source=images:{root / 'flat'}", "data.test_fraction=0.1"],
         "both set the held-out data"),
        (["data.test_source=images:/x"], "data.test_source applies to images:PATH and parquet:PATH"),
        ([f"data.source=images:{root / 'flat'}", "data.s3_endpoint=127.0.0.1:9"], "must be a URL"),
        ([f"data.source=images:{root / 'flat'}", "loss.name=soft_infonce"], "has no labels"),
        (["data.image_size=32"], "data.image_size applies to images:PATH and parquet:PATH"),
        (["augment.preset=imagenet"], "augment.preset"),
        (["data.source=images:hdfs://nn/data"], "unsupported storage scheme 'hdfs://'"),
        ([f"data.source=images:{root / 'labelled'}"], "look like splits, not classes: set data.source=images:"),
    ]
    for overrides, fragment in cases:
        with pytest.raises(ConfigError, match=None) as err:
            load_config("configs/digits.yaml", overrides)
        assert fragment in str(err.value), (overrides, str(err.value))


def test_s3_source_lists_and_reads_from_a_real_s3_server(tmp_path, folders, monkeypatch):
    from _s3 import CREDENTIALS, moto_s3

    root, labelled, _ = folders
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with moto_s3() as s3:
        s3.upload_dir(root / "labelled" / "train", "bucket/train")
        source = make_source("images:s3://bucket/train", s3_endpoint=s3.endpoint)
        assert source.probe().num_classes == 3
        listing = source.list()
        local = make_source(f"images:{root / 'labelled' / 'train'}").list()
        assert listing.table.equals(local.table) and listing.classes == local.classes
        rows = np.array([11, 2, 5])
        locations = local.table.column("location").to_pylist()
        assert [bytes(b) for b in source.read(listing.table.take(rows)).x] == \
            [(root / "labelled" / "train" / locations[r]).read_bytes() for r in rows]
        with pytest.raises(SourceError, match="folder not found"):
            make_source("images:s3://bucket/nothing", s3_endpoint=s3.endpoint).probe()
        with pytest.raises(SourceError, match="the bucket does not exist"):
            make_source("parquet:s3://nobucket/x/*.parquet", s3_endpoint=s3.endpoint).probe()
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # the standard variable works as well
        assert make_source("images:s3://bucket/train").probe().labelled
    t0 = time.perf_counter()
    with pytest.raises(SourceError, match=r"images:s3://bucket/train: cannot reach the storage at http://127.0.0.1:"):
        make_source("images:s3://bucket/train", s3_endpoint=s3.endpoint).probe()  # the server is gone now
    assert time.perf_counter() - t0 < 10  # a short timeout, not Ray's minutes of retries


def test_cli_validate_says_what_the_data_is(folders, capsys):
    from pipelines.cli import main

    root, _, _ = folders
    train, flat = root / "labelled" / "train", root / "flat"
    assert main(["validate", "configs/digits.yaml", "--set", f"data.source=images:{train}",
                 "--set", f"data.test_source=images:{flat}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"data: images:{train}: found, labelled, 3 classes" in out
    assert f"data: images:{flat}: found, unlabelled: kNN and the linear probe will be skipped" in out
