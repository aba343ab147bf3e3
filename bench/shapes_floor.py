"""The shapes benchmark (pipelines/shapes.py, issue 15): its floor, its ceiling and a plain SimCLR loop.

    python bench/shapes_floor.py [--data DIR] [--train 1200] [--test 200] [--epochs 10] [--width 16]
                                 [--batch 256] [--threads 2] [--skip supervised,simclr]

On one generated set (``hardbatch generate shapes``; written to ``--data`` unless it is there), with
the evaluation hardbatch runs use (trainers/evaluate.py: weighted cosine kNN with k = 20, T = 0.07,
and the logistic probe on standardised features):

* floor: raw pixels (flattened, centred, L2-normalised for kNN) -> kNN and logistic-probe accuracy;
* ceiling: the same encoder as the config (SmallCNN of ``--width``) trained *supervised* (cross
  entropy on one ``natural`` view, the labels known) for ``--epochs`` -> kNN and probe on its
  features (the ceiling to read), and its own head's test accuracy (fitted on crops, scored on whole
  images, so lower);
* a plain SimCLR loop (one process; the same encoder with hardbatch's projector, InfoNCE at T = 0.2,
  two ``natural`` views, AdamW, uniform batches of ``--batch``) -> kNN after every epoch and the probe
  at the end: whether self-supervised learning can find the classes here in this budget at all,
  before any sampler is compared.

Prints one table; seconds per epoch are measured on this machine in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.synthetic import image_folder  # noqa: E402
from trainers.augment import natural_augment, one_view, to_float  # noqa: E402
from trainers.evaluate import knn_accuracy, linear_probe_accuracy  # noqa: E402
from trainers.losses import LOSSES  # noqa: E402
from trainers.models import build_network, network_spec  # noqa: E402


def load_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``uint8 [N, 3, H, W]`` images and ``int64 [N]`` labels of an image folder (class sub-folders)."""
    from PIL import Image

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    xs, ys = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            with Image.open(path) as img:
                xs.append(np.asarray(img.convert("RGB")).transpose(2, 0, 1))
            ys.append(label)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def pixel_features(x: np.ndarray) -> torch.Tensor:
    flat = torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255.0)
    return flat - flat.mean(0, keepdim=True)


def _normed(f: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(f, dim=1)


@torch.no_grad()
def features(encoder: torch.nn.Module, x: np.ndarray, batch: int = 1024) -> torch.Tensor:
    encoder.eval()
    out = torch.cat([encoder(to_float(torch.from_numpy(x[a:a + batch]))) for a in range(0, len(x), batch)])
    encoder.train()
    return out


def evaluate(encoder, train, test) -> dict[str, float]:
    f_train, f_test = features(encoder, train[0]), features(encoder, test[0])
    y_train, y_test = torch.from_numpy(train[1]), torch.from_numpy(test[1])
    return {"knn": knn_accuracy(_normed(f_train), y_train, _normed(f_test), y_test),
            "probe": linear_probe_accuracy(f_train, y_train, f_test, y_test)}


def supervised(train, test, model_cfg: dict, epochs: int, batch: int, seed: int, crop_min: float) -> dict[str, float]:
    """The same encoder trained with the labels: the ceiling of what its features can reach here."""
    torch.manual_seed(seed)
    shape = train[0].shape[1:]
    encoder = build_network(network_spec("siamese", model_cfg, shape)).encoder
    num_classes = int(train[1].max()) + 1
    head = torch.nn.Linear(model_cfg["embed_dim"], num_classes)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    augment = natural_augment(shape[1:], crop_min=crop_min)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(len(train[0]))
        for a in range(0, len(order) - batch + 1, batch):
            ids = order[a:a + batch]
            views = to_float(one_view(torch.from_numpy(train[0][ids]), augment))
            loss = torch.nn.functional.cross_entropy(head(encoder(views)), torch.from_numpy(train[1][ids]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = (time.perf_counter() - t0) / max(epochs, 1)
    with torch.no_grad():
        encoder.eval()
        logits = head(features(encoder, test[0]))
    accuracy = float((logits.argmax(1).numpy() == test[1]).mean())
    return {"accuracy": accuracy, **evaluate(encoder, train, test), "s_per_epoch": seconds}


def simclr(train, test, model_cfg: dict, epochs: int, batch: int, seed: int, temperature: float,
           crop_min: float) -> dict:
    """A plain single-process SimCLR loop; kNN after every epoch, the probe at the end."""
    torch.manual_seed(seed)
    shape = train[0].shape[1:]
    net = build_network(network_spec("siamese", model_cfg, shape)).train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = LOSSES["infonce"](temperature=temperature)
    augment = natural_augment(shape[1:], crop_min=crop_min)
    rng = np.random.default_rng(seed)
    knn_by_epoch, losses, t0 = [], [], time.perf_counter()
    y_train, y_test = torch.from_numpy(train[1]), torch.from_numpy(test[1])
    for _ in range(epochs):
        order = rng.permutation(len(train[0]))
        epoch_loss = []
        for a in range(0, len(order) - batch + 1, batch):
            x = torch.from_numpy(train[0][order[a:a + batch]])
            views = to_float(torch.cat([one_view(x, augment), one_view(x, augment)]))
            _, z = net(views)
            loss = loss_fn(*z.chunk(2))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss.append(loss.item())
        losses.append(float(np.mean(epoch_loss)))
        f_train, f_test = features(net.encoder, train[0]), features(net.encoder, test[0])
        knn_by_epoch.append(knn_accuracy(_normed(f_train), y_train, _normed(f_test), y_test))
        print(f"  simclr epoch {len(knn_by_epoch)}: loss {losses[-1]:.3f}  kNN {knn_by_epoch[-1]:.3f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = (time.perf_counter() - t0) / max(epochs, 1)
    # the last epoch's features (just used for its kNN) give the probe too
    return {"knn_by_epoch": knn_by_epoch, "loss_by_epoch": losses, "knn": knn_by_epoch[-1],
            "probe": linear_probe_accuracy(f_train, y_train, f_test, y_test), "s_per_epoch": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/tmp/hardbatch-shapes", help="the generated set (made if missing)")
    parser.add_argument("--train", type=int, default=1200, help="training images per class when generating")
    parser.add_argument("--test", type=int, default=200, help="test images per class when generating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=int, default=16, help="SmallCNN width (channels of its first stage)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--crop-min", type=float, default=0.08, help="the smallest crop, a fraction of the area")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated: supervised, simclr")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "train").is_dir():
        t0 = time.perf_counter()
        image_folder(data, num_classes=10, per_class={"train": args.train, "test": args.test}, size=32,
                     seed=args.seed, kind="shapes")
        print(f"generated {data} in {time.perf_counter() - t0:.1f} s")
    train, test = load_split(data / "train"), load_split(data / "test")
    print(f"{len(train[0])} training / {len(test[0])} test images, {int(train[1].max()) + 1} classes; "
          f"chance {1 / (int(train[1].max()) + 1):.2f}")
    model_cfg = {"backbone": "small_cnn", "width": args.width, "embed_dim": 128, "proj_hidden": 256, "proj_dim": 64}
    rows = []
    f_train, f_test = pixel_features(train[0]), pixel_features(test[0])
    y_train, y_test = torch.from_numpy(train[1]), torch.from_numpy(test[1])
    rows.append(("raw pixels (floor)", "-", knn_accuracy(_normed(f_train), y_train, _normed(f_test), y_test),
                 linear_probe_accuracy(f_train, y_train, f_test, y_test, max_iter=300), "-"))
    print(f"floor: kNN {rows[-1][2]:.3f}, probe {rows[-1][3]:.3f}", flush=True)
    skip = set(filter(None, args.skip.split(",")))
    if "supervised" not in skip:
        sup = supervised(train, test, model_cfg, args.epochs, args.batch, args.seed, args.crop_min)
        rows.append((f"supervised SmallCNN-{args.width} (ceiling)", f"{sup['accuracy']:.3f}", sup["knn"],
                     sup["probe"], f"{sup['s_per_epoch']:.1f}"))
        print(f"ceiling: accuracy {sup['accuracy']:.3f}, kNN {sup['knn']:.3f}, probe {sup['probe']:.3f}", flush=True)
    if "simclr" not in skip:
        ssl = simclr(train, test, model_cfg, args.epochs, args.batch, args.seed, args.temperature, args.crop_min)
        rows.append((f"plain SimCLR SmallCNN-{args.width}, T={args.temperature}", "-", ssl["knn"], ssl["probe"],
                     f"{ssl['s_per_epoch']:.1f}"))
    print(f"\n{args.epochs} epochs, batch {args.batch}, crops from {args.crop_min} of the area, {args.threads} threads\n")
    print("| features | test accuracy | kNN (k=20) | logistic probe | s / epoch |")
    print("|---|---|---|---|---|")
    for name, acc, knn, probe, sec in rows:
        print(f"| {name} | {acc} | {knn:.3f} | {probe:.3f} | {sec} |")


if __name__ == "__main__":
    main()
