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
Randomness (augmentations, mixup weights) comes from torch's global generator, which the loop seeds
per rank.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samplers.stats import batch_stats
from trainers.augment import digits_augment, one_view, two_views
from trainers.evaluate import (
    alignment,
    embed,
    expected_calibration_error,
    knn_accuracy,
    linear_probe_accuracy,
    retrieval_accuracy,
    uniformity,
)
from trainers.losses import ContrastiveLoss, ema_momentum, mixup_inputs, mixup_targets, normalize, tilt_scores
from trainers.losses.mveb import vmf_concentration
from trainers.models import build_network, unwrap

TARGET_FILE = "target.pt"  # the EMA target network in a checkpoint


class Task:
    """Base class: a Siamese step is the default; subclasses change what they must.

    Args:
        spec: the network spec (:func:`trainers.models.network_spec`).
        loss_fn: the built loss module.
        options: the loss's training options (``LossConfig.training()`` as a dict), or ``None``.
        eval_cfg: the ``eval:`` config section.
    """

    kind: ClassVar[str] = "siamese"

    def __init__(self, spec: dict[str, Any], loss_fn: ContrastiveLoss, options: Optional[dict[str, Any]] = None,
                 eval_cfg: Optional[dict[str, Any]] = None):
        self.spec = spec
        self.loss_fn = loss_fn
        self.options = dict(options or {})
        self.eval_cfg = {"knn_k": 20, "knn_temperature": 0.07, **(eval_cfg or {})}
        shape = spec["x_shape"]
        self.augment = digits_augment(int(shape[-1])) if len(shape) == 3 else None

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

    def images(self, store, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(store.take(ids)))

    def augmented(self, x: torch.Tensor) -> torch.Tensor:
        """One augmented view of every sample (vectors are returned as they are)."""
        if self.augment is None:
            return x
        return one_view(x, self.augment)

    def step_loss(self, model: nn.Module, store, ids: np.ndarray,
                  device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of this rank's batch ``ids`` and per-step diagnostics (floats)."""
        view_a, view_b = two_views(self.images(store, ids), self.augment)
        _, z = model(torch.cat([view_a, view_b]).to(device))
        z_a, z_b = z.chunk(2)
        return self.loss_fn(z_a, z_b), {}

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, train_store, test_store, plans: np.ndarray,
                 final: bool = False) -> dict[str, float]:
        """Batch statistics of ``plans`` and the held-out metrics; ``final`` adds the linear probe.

        Labels are used only here (and by the classifier's loss): the same-class rate of batches, the
        kNN votes and the probe.
        """
        net = unwrap(model)
        labels = train_store.column("label") if train_store.has_labels else None
        graph_space = embed(net, train_store.column("x"), encode="graph_embedding")  # where the graph lives
        stats = batch_stats(plans, graph_space.numpy(), labels)
        out = {f"sampler/{k}": v for k, v in stats.items() if k != "num_batches"}
        out.update(self.task_metrics(net, train_store, test_store))
        if train_store.has_labels and test_store.has_labels:
            out.update(self.label_metrics(net, train_store, test_store, final))
        return out

    def task_metrics(self, net: nn.Module, train_store, test_store) -> dict[str, float]:
        """Alignment and uniformity (Wang and Isola) of the loss space on two fixed views of the
        held-out samples."""
        test_x = test_store.column("x")
        with torch.random.fork_rng():  # the same views every epoch, the training streams untouched
            torch.manual_seed(0)
            view_a, view_b = two_views(torch.from_numpy(np.array(test_x)), self.augment)
        z_a, z_b = embed(net, view_a.numpy(), projected=True), embed(net, view_b.numpy(), projected=True)
        return {"eval/alignment": alignment(z_a, z_b),
                "eval/uniformity": uniformity(embed(net, test_x, projected=True))}

    def label_metrics(self, net: nn.Module, train_store, test_store, final: bool) -> dict[str, float]:
        """kNN accuracy (k = ``eval.knn_k`` and 200) on encoder features; the linear probe when ``final``."""
        train_feats, test_feats = embed(net, train_store.column("x")), embed(net, test_store.column("x"))
        train_labels = torch.tensor(train_store.column("label"))
        test_labels = torch.tensor(test_store.column("label"))
        temperature = self.eval_cfg["knn_temperature"]
        out = {"eval/knn_acc": knn_accuracy(train_feats, train_labels, test_feats, test_labels,
                                            k=self.eval_cfg["knn_k"], temperature=temperature),
               "eval/knn_acc_k200": knn_accuracy(train_feats, train_labels, test_feats, test_labels,
                                                 k=200, temperature=temperature)}
        if final:
            out["eval/linear_acc"] = linear_probe_accuracy(train_feats, train_labels, test_feats, test_labels)
        return out


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

    def step_loss(self, model, store, ids, device):
        view_a, view_b = two_views(self.images(store, ids), self.augment)
        views = torch.cat([view_a, view_b]).to(device)
        _, z = model(views)
        with torch.no_grad():
            _, t = self.target(views)
        z_a, z_b = z.chunk(2)
        t_a, t_b = t.chunk(2)
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

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.num_classes = int(self.spec["num_classes"])
        self.targets = self.options.get("targets", "smoothing")
        self.mixup_alpha = float(self.options.get("mixup_alpha", 0.8))

    def step_loss(self, model, store, ids, device):
        x = self.augmented(self.images(store, ids))
        labels = torch.from_numpy(np.ascontiguousarray(store.take(ids, "label")))
        if self.targets == "mixup":
            lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
            x = mixup_inputs(x, lam)
            targets = mixup_targets(labels, self.num_classes, lam, self.loss_fn.smoothing)
        else:
            targets = labels
        _, logits = model(x.to(device))
        loss = self.loss_fn(logits, None, targets.to(device))
        accuracy = float((logits.detach().argmax(1).cpu() == labels).double().mean())
        return loss, {"train/accuracy": accuracy}

    def task_metrics(self, net, train_store, test_store) -> dict[str, float]:
        logits = embed(net, test_store.column("x"), projected=True, normalize=False)
        labels = torch.tensor(test_store.column("label"))
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

    def step_loss(self, model, store, ids, device):
        u = self.augmented(self.images(store, ids))
        v = torch.from_numpy(np.ascontiguousarray(store.take(ids, "v")))
        z_u, z_v = model(u.to(device), v.to(device))
        return self.loss_fn(z_u, z_v), {}

    def task_metrics(self, net, train_store, test_store) -> dict[str, float]:
        v = torch.from_numpy(np.array(test_store.column("v")))
        z_u = embed(net, test_store.column("x"), projected=True, normalize=False)
        z_v = embed(net, v.numpy(), projected=True, normalize=False, encode="encode_v")
        scores = tilt_scores(z_u.double(), z_v.double(), self.loss_fn.tilt, self.loss_fn.temperature)
        return {"eval/retrieval_acc": retrieval_accuracy(scores, v, v),
                "eval/retrieval_acc_u": retrieval_accuracy(scores.T, v, v),
                "eval/alignment": alignment(F.normalize(z_u, dim=1), F.normalize(z_v, dim=1)),
                "eval/uniformity": uniformity(F.normalize(z_u, dim=1))}


TASKS: dict[str, type[Task]] = {"siamese": SiameseTask, "ema": EMATask, "classifier": ClassifierTask,
                                "bimodal": BimodalTask}


def build_task(spec: dict[str, Any], loss_fn: ContrastiveLoss, options: Optional[dict[str, Any]] = None,
               eval_cfg: Optional[dict[str, Any]] = None) -> Task:
    """The task of ``spec["kind"]``."""
    if spec["kind"] not in TASKS:
        raise ValueError(f"task kind must be one of {sorted(TASKS)}, got {spec['kind']!r}")
    return TASKS[spec["kind"]](spec, loss_fn, options, eval_cfg)
