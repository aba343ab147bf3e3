"""How each family of losses is trained: its network, one step's loss, its extra state, its metrics.

The worker loop (:mod:`trainers.loop`) is the same for every loss; what differs lives here.

==============  =======================  =============================================================
kind            losses                   one step
==============  =======================  =============================================================
``siamese``     infonce, sscl            two augmented views -> shared encoder+projector -> loss(z_a, z_b)
``ema``         mveb                     as siamese, plus an EMA target network for the targets;
                                         logs the vMF concentration kappa and the momentum
``classifier``  soft_infonce             one augmented view (mixed up with the flipped batch for
                                         mixup targets) -> encoder + linear head -> loss(logits,
                                         targets); logs accuracy, and calibration (ECE) at evaluation
``bimodal``     clip, conditional, joint two towers: u -> z_u, v -> z_v -> loss(z_u, z_v); logs
                                         retrieval accuracy
==============  =======================  =============================================================

A task holds no Ray: it is driven by the loop and tested directly (tests/trainers/test_tasks.py).
What a batch holds is the task's :meth:`Task.batch_maker`, a small recipe the worker's feed
(:mod:`trainers.feed`) runs in parallel processes: decoded, augmented views (uint8 for natural
images, moved to the device as uint8 and scaled there), labels, the v side. Views are seeded per
batch by the feed; other randomness (mixup weights) comes from torch's global generator, which the
loop seeds per rank.

Evaluation reads the stores in chunks: at most ``eval.max_samples`` held-out samples (the store
holds no more) against a fixed seeded subset of at most ``eval.max_train_samples`` training samples.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samplers.stats import batch_stats
from trainers.augment import CROP_MIN, to_float
from trainers.evaluate import (
    alignment,
    embed_ids,
    expected_calibration_error,
    knn_accuracy,
    linear_probe_accuracy,
    uniformity,
)
from trainers.feed import BatchMaker
from trainers.losses import ContrastiveLoss, ema_momentum, mixup_inputs, mixup_targets, normalize, tilt_scores
from trainers.losses.mveb import vmf_concentration
from trainers.models import build_network, unwrap

TARGET_FILE = "target.pt"  # the EMA target network in a checkpoint
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype


class Task:
    """Base class: a Siamese step is the default; subclasses change what they must.

    Args:
        spec: the network spec (:func:`trainers.models.network_spec`).
        loss_fn: the built loss module.
        options: the loss's training options (``LossConfig.training()`` as a dict), or ``None``.
        eval_cfg: the ``eval:`` config section.
        augment: ``{"preset": "digits" | "natural", "blur": bool, "crop_min": float}`` (the driver resolves
            ``augment.preset: auto``); default: ``digits`` for 1-channel images, ``natural`` otherwise.
        precision: ``fp32``, or ``bf16``/``fp16``: the dtype of the forward pass under autocast (the loss
            itself always computes in fp32, see ``ContrastiveLoss.__call__``).
        channels_last: images go to the network in NHWC layout (the loop converts the weights).

    Every tensor of a step goes to the ``device`` the loop passes in (the one Ray Train gives the
    worker); nothing here assumes the CPU.
    """

    kind: ClassVar[str] = "siamese"
    views: ClassVar[int] = 2  # augmented views of x per sample in a batch

    def __init__(self, spec: dict[str, Any], loss_fn: ContrastiveLoss, options: Optional[dict[str, Any]] = None,
                 eval_cfg: Optional[dict[str, Any]] = None, augment: Optional[dict[str, Any]] = None,
                 precision: str = "fp32", channels_last: bool = False):
        if precision != "fp32" and precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.precision = precision
        self.channels_last = channels_last
        self.spec = spec
        self.loss_fn = loss_fn
        self.options = dict(options or {})
        self.eval_cfg = {"knn_k": 20, "knn_temperature": 0.07, "max_samples": 10000, "max_train_samples": 20000,
                         "batch_size": 512, **(eval_cfg or {})}
        shape = tuple(spec["x_shape"])
        self.augment_spec: Optional[dict[str, Any]] = None
        if len(shape) == 3:  # images get views; vectors are used as they are
            preset = (augment or {}).get("preset") or "auto"
            if preset == "auto":
                preset = "digits" if shape[0] == 1 else "natural"
            self.augment_spec = {"preset": preset, "size": tuple(int(d) for d in shape[1:]), "channels": int(shape[0]),
                                 "blur": bool((augment or {}).get("blur", False)),
                                 "crop_min": float((augment or {}).get("crop_min", CROP_MIN))}

    # -- the network and its state ---------------------------------------------------------------

    def build(self) -> nn.Module:
        """A fresh network (the loop seeds torch first, so every rank builds the same one)."""
        return build_network(self.spec)

    def attach(self, model: nn.Module) -> None:
        """Called once after the model is prepared (DDP-wrapped) and before training."""

    def after_step(self, model: nn.Module, progress: float) -> None:
        """Called after every optimiser step; ``progress`` = steps done / total steps, in (0, 1]."""

    def save_state(self, directory: Path) -> None:
        """Write state beyond the model and optimiser into a checkpoint directory."""

    def load_state(self, directory: Path) -> None:
        """Restore what :meth:`save_state` wrote (resume after a failure)."""

    # -- one step ----------------------------------------------------------------------------------

    def autocast(self, device: torch.device):
        """The forward pass's precision context on ``device`` (a no-op for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=AUTOCAST_DTYPES[self.precision])

    def inputs(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch of samples on ``device`` as float (uint8 pixels scaled there), NHWC when ``channels_last``."""
        x = to_float(x.to(device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def batch_maker(self, store, views: Optional[int] = None) -> BatchMaker:
        """The recipe of this task's batches from ``store`` (what the feed decodes and augments)."""
        return BatchMaker(codec=store.codec, v_codec=store.v_codec, views=views or self.views,
                          augment=self.augment_spec, labels=self.kind == "classifier", pairs=self.kind == "bimodal")

    def batch_loss(self, model: nn.Module, batch: dict[str, Any],
                   device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of this rank's batch (from the feed) and per-step diagnostics (floats)."""
        view_a, view_b = (self.inputs(v, device) for v in batch["views"])
        with self.autocast(device):
            _, z = model(torch.cat([view_a, view_b]))
        z_a, z_b = z.float().chunk(2)
        return self.loss_fn(z_a, z_b), {}

    def step_loss(self, model: nn.Module, store, ids: np.ndarray,
                  device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """:meth:`batch_loss` of the batch ``ids`` made in this process (no feed), its views seeded from
        torch's global generator."""
        batch = self.batch_maker(store).make(store, ids, seed=int(torch.randint(0, 2**62, (1,))))
        batch.pop("failures")
        return self.batch_loss(model, batch, device)

    # -- evaluation ------------------------------------------------------------------------------

    def eval_rows(self, store) -> int:
        """Samples per evaluation forward pass: ``eval.batch_size``, fewer for large images so that
        one chunk holds at most 2^23 input values (55 samples of 3 x 224 x 224)."""
        per_sample = int(np.prod(store.sample_shape))
        return int(max(8, min(int(self.eval_cfg["batch_size"]), (1 << 23) // max(per_sample, 1))))

    def bank(self, train_store) -> np.ndarray:
        """The training ids evaluation compares against: all of them, or a fixed seeded subset of
        ``eval.max_train_samples``. O(N) once."""
        cap = int(self.eval_cfg["max_train_samples"])
        if train_store.size <= cap:
            return np.arange(train_store.size)
        return np.sort(np.random.default_rng(0).choice(train_store.size, cap, replace=False))

    def evaluate(self, model: nn.Module, train_store, test_store, plans: np.ndarray,
                 final: bool = False) -> dict[str, float]:
        """Batch statistics of ``plans`` and the held-out metrics; ``final`` adds the linear probe.

        Labels are used only here (and by the classifier's loss): the same-class rate of batches, the
        kNN votes and the probe. The batch statistics use the epoch's first batches, as many as fit
        in ``eval.max_train_samples`` samples (all of them on small data).

        Shape:
            plans: ``[S, W, b]`` the epoch's plans (S steps, W ranks).
        """
        net = unwrap(model)
        out = self.batch_metrics(net, train_store, np.asarray(plans))
        out.update(self.task_metrics(net, train_store, test_store))
        if train_store.has_labels and test_store.has_labels:
            out.update(self.label_metrics(net, train_store, test_store, final))
        return out

    def batch_metrics(self, net: nn.Module, train_store, plans: np.ndarray) -> dict[str, float]:
        """Hardness (and same-class rate) of the first batches of ``plans``, in the graph's space."""
        batches = plans.reshape(len(plans), -1)
        keep = max(1, min(len(batches), int(self.eval_cfg["max_train_samples"]) // max(batches.shape[1], 1)))
        batches = batches[:keep]
        ids, local = np.unique(batches, return_inverse=True)
        graph_space = embed_ids(net, train_store, ids, self.eval_rows(train_store), encode="graph_embedding")
        labels = train_store.labels[ids] if train_store.has_labels else None
        stats = batch_stats(local.reshape(batches.shape), graph_space.numpy(), labels)
        return {f"sampler/{k}": v for k, v in stats.items() if k != "num_batches"}

    def _fixed_views(self, net: nn.Module, store) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss-space outputs of two fixed augmented views of every held-out sample, in chunks."""
        maker = self.batch_maker(store, views=2)
        size = self.eval_rows(store)
        parts_a, parts_b = [], []
        for start in range(0, store.size, size):
            ids = np.arange(start, min(start + size, store.size))
            batch = maker.make(store, ids, seed=start)  # the same views every epoch
            parts_a.append(embed_views(net, batch["views"][0]))
            parts_b.append(embed_views(net, batch["views"][1]))
        return torch.cat(parts_a), torch.cat(parts_b)

    def task_metrics(self, net: nn.Module, train_store, test_store) -> dict[str, float]:
        """Alignment and uniformity (Wang and Isola) of the loss space on two fixed views of the
        held-out samples."""
        z_a, z_b = self._fixed_views(net, test_store)
        plain = embed_ids(net, test_store, np.arange(test_store.size), self.eval_rows(test_store), projected=True)
        return {"eval/alignment": alignment(z_a, z_b), "eval/uniformity": uniformity(plain)}

    def label_metrics(self, net: nn.Module, train_store, test_store, final: bool) -> dict[str, float]:
        """kNN accuracy (k = ``eval.knn_k`` and 200) on encoder features; the linear probe when ``final``."""
        bank = self.bank(train_store)
        size = self.eval_rows(train_store)
        train_feats = embed_ids(net, train_store, bank, size)
        test_feats = embed_ids(net, test_store, np.arange(test_store.size), size)
        train_labels = torch.from_numpy(train_store.labels[bank])
        test_labels = torch.from_numpy(np.array(test_store.labels))  # a copy: store arrays may be read-only
        temperature = self.eval_cfg["knn_temperature"]
        out = {"eval/knn_acc": knn_accuracy(train_feats, train_labels, test_feats, test_labels,
                                            k=self.eval_cfg["knn_k"], temperature=temperature),
               "eval/knn_acc_k200": knn_accuracy(train_feats, train_labels, test_feats, test_labels,
                                                 k=200, temperature=temperature)}
        if final:
            out["eval/linear_acc"] = linear_probe_accuracy(train_feats, train_labels, test_feats, test_labels)
        return out


@torch.no_grad()
def embed_views(net: nn.Module, views: torch.Tensor, projected: bool = True) -> torch.Tensor:
    """L2-normalised loss-space outputs of a batch of views (uint8 or float) in eval mode.

    Shape:
        views: ``[B, C, H, W]`` -> ``[B, D]``.
    """
    from trainers.evaluate import embed

    return embed(net, views.numpy(), batch_size=len(views) or 1, projected=projected)


class SiameseTask(Task):
    """InfoNCE and SSCL: two augmented views through one shared network (the base behaviour)."""


class EMATask(Task):
    """MVEB: the Siamese step plus an EMA target network for the two views (ALGORITHMS.md 5.2).

    The target starts as a copy of the online network and follows it after every step with the
    cosine momentum schedule ``m = 1 - (1 - ema_base)(cos(pi p) + 1) / 2`` (``p`` = progress). It is
    never wrapped in DDP: each rank updates its copy from the same (synchronised) online weights, so
    the copies stay identical. It runs in train mode (batch-norm statistics of the batch, as the
    online network) without gradients, and is saved with every checkpoint.
    """

    kind = "ema"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ema_base = float(self.options.get("ema_base", 0.996))
        self.target: Optional[nn.Module] = None
        self.momentum = self.ema_base

    def attach(self, model: nn.Module) -> None:
        online = unwrap(model)
        self.target = copy.deepcopy(online)
        for p in self.target.parameters():
            p.requires_grad_(False)
        device = next(online.parameters()).device
        self.target.to(device).train()

    def batch_loss(self, model, batch, device):
        views = torch.cat([self.inputs(v, device) for v in batch["views"]])
        with self.autocast(device):
            _, z = model(views)
            with torch.no_grad():
                _, t = self.target(views)
        z_a, z_b = z.float().chunk(2)
        t_a, t_b = t.float().chunk(2)
        loss = self.loss_fn(z_a, z_b, targets=(t_a, t_b))
        kappa = float(vmf_concentration(normalize(z_a.detach()), self.loss_fn.min_width))
        return loss, {"mveb/kappa": kappa, "mveb/momentum": self.momentum}

    @torch.no_grad()
    def after_step(self, model: nn.Module, progress: float) -> None:
        self.momentum = ema_momentum(min(max(progress, 0.0), 1.0), base=self.ema_base)
        online = unwrap(model)
        for p_t, p_o in zip(self.target.parameters(), online.parameters()):
            p_t.mul_(self.momentum).add_(p_o.detach(), alpha=1.0 - self.momentum)
        for b_t, b_o in zip(self.target.buffers(), online.buffers()):
            b_t.copy_(b_o)

    def save_state(self, directory: Path) -> None:
        torch.save(self.target.state_dict(), Path(directory, TARGET_FILE))

    def load_state(self, directory: Path) -> None:
        path = Path(directory, TARGET_FILE)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {directory} has no {TARGET_FILE}: cannot resume the MVEB target")
        self.target.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


class ClassifierTask(Task):
    """Soft-target InfoNCE: a conditional model (encoder + linear head) trained on labelled images.

    Targets (``loss.soft_infonce.targets``): ``smoothing`` passes the integer labels, which the loss
    smooths by its ``smoothing``; ``mixup`` mixes the batch with its flipped copy by a weight
    ``lam ~ Beta(mixup_alpha, mixup_alpha)`` (timm's batch mode) and builds the matching soft targets
    (label smoothing folded in). The noise distribution is set on the loss by the driver.
    Evaluation adds held-out accuracy (argmax of the logits) and the expected calibration error of
    ``softmax(logits / t)`` in 15 bins (ALGORITHMS.md 1.7).
    """

    kind = "classifier"
    views = 1

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.num_classes = int(self.spec["num_classes"])
        self.targets = self.options.get("targets", "smoothing")
        self.mixup_alpha = float(self.options.get("mixup_alpha", 0.8))

    def batch_loss(self, model, batch, device):
        x = to_float(batch["views"][0])
        labels = batch["label"]
        if self.targets == "mixup":
            lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
            x = mixup_inputs(x, lam)
            targets = mixup_targets(labels, self.num_classes, lam, self.loss_fn.smoothing)
        else:
            targets = labels
        with self.autocast(device):
            _, logits = model(self.inputs(x, device))
        logits = logits.float()
        loss = self.loss_fn(logits, None, targets.to(device))
        accuracy = float((logits.detach().argmax(1) == labels.to(device)).double().mean())
        return loss, {"train/accuracy": accuracy}

    def task_metrics(self, net, train_store, test_store) -> dict[str, float]:
        logits = embed_ids(net, test_store, np.arange(test_store.size), self.eval_rows(test_store),
                           projected=True, normalize=False)
        labels = torch.from_numpy(np.array(test_store.labels))
        probs = torch.softmax(logits.double() / self.loss_fn.temperature, dim=1)
        return {"eval/accuracy": float((logits.argmax(1) == labels).double().mean()),
                "eval/ece": expected_calibration_error(probs, labels, bins=15)}


class BimodalTask(Task):
    """Two towers on paired data (u = ``x``, v = ``v``), trained with a bimodal loss.

    Images on the u side are augmented (one view); vectors are used as they are. Evaluation on the
    held-out pairs: top-1 retrieval of v from u (``eval/retrieval_acc``) and of u from v
    (``eval/retrieval_acc_u``) under the loss's own tilt and temperature, counting candidates
    equal to the true partner as hits (for digits pairs retrieving v is classification), and the
    alignment of pairs / uniformity of u in the shared space.
    """

    kind = "bimodal"
    views = 1

    def batch_loss(self, model, batch, device):
        u = self.inputs(batch["views"][0], device)
        with self.autocast(device):
            z_u, z_v = model(u, batch["v"].to(device, non_blocking=True))
        return self.loss_fn(z_u.float(), z_v.float()), {}

    def task_metrics(self, net, train_store, test_store) -> dict[str, float]:
        ids, size = np.arange(test_store.size), self.eval_rows(test_store)
        v = torch.from_numpy(test_store.take(ids, "v"))
        z_u = embed_ids(net, test_store, ids, size, projected=True, normalize=False)
        z_v = embed_ids(net, test_store, ids, size, projected=True, normalize=False, encode="encode_v", column="v")
        acc_v, acc_u = chunked_retrieval(z_u.double(), z_v.double(), v, self.loss_fn.tilt, self.loss_fn.temperature,
                                         chunk=size)
        return {"eval/retrieval_acc": acc_v,
                "eval/retrieval_acc_u": acc_u,
                "eval/alignment": alignment(F.normalize(z_u, dim=1), F.normalize(z_v, dim=1)),
                "eval/uniformity": uniformity(F.normalize(z_u, dim=1))}


def chunked_retrieval(z_u: torch.Tensor, z_v: torch.Tensor, keys: torch.Tensor, tilt: str, temperature: float,
                      chunk: int = 512) -> tuple[float, float]:
    """Top-1 retrieval accuracy of v from u and of u from v (``trainers.evaluate.retrieval_accuracy``),
    scoring ``chunk`` queries at a time (never the whole score matrix). Cost: O(N^2 D) time, O(chunk N) memory.

    Shape:
        z_u, z_v: ``[N, D]`` (row i is a pair); keys: ``[N, d]`` the v values (equal keys count as hits).
    """
    hits_v = hits_u = 0.0
    for a in range(0, len(z_u), chunk):
        rows = slice(a, a + chunk)
        best_v = tilt_scores(z_u[rows], z_v, tilt, temperature).argmax(dim=1)  # v for each u query
        hits_v += float((keys[best_v] == keys[rows]).all(dim=1).double().sum())
        best_u = tilt_scores(z_u, z_v[rows], tilt, temperature).argmax(dim=0)  # u for each v query
        hits_u += float((keys[best_u] == keys[rows]).all(dim=1).double().sum())
    return hits_v / max(len(z_u), 1), hits_u / max(len(z_u), 1)


TASKS: dict[str, type[Task]] = {"siamese": SiameseTask, "ema": EMATask, "classifier": ClassifierTask,
                                "bimodal": BimodalTask}


def build_task(spec: dict[str, Any], loss_fn: ContrastiveLoss, options: Optional[dict[str, Any]] = None,
               eval_cfg: Optional[dict[str, Any]] = None, augment: Optional[dict[str, Any]] = None,
               precision: str = "fp32", channels_last: bool = False) -> Task:
    """The task of ``spec["kind"]``."""
    if spec["kind"] not in TASKS:
        raise ValueError(f"task kind must be one of {sorted(TASKS)}, got {spec['kind']!r}")
    return TASKS[spec["kind"]](spec, loss_fn, options, eval_cfg, augment, precision, channels_last)
