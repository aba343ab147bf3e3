"""The GPU path on a real CUDA device (marker ``gpu``; run by ``bench/gpu_check.sh``).

Deselected where no CUDA device is visible (tests/conftest.py says how many, at the end of the run):
the CPU suite exercises the same device plumbing through the meta device
(tests/trainers/test_backbones.py), these run it on the hardware.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipelines.store import SampleStore
from trainers.device import Stepper, mean_across_ranks, prepare_network
from trainers.losses import LOSSES
from trainers.models import network_spec, save_network
from trainers.tasks import build_task

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
SMALL = {"width": 8, "embed_dim": 32, "proj_hidden": 64, "proj_dim": 16}


def _digits(n: int = 256) -> SampleStore:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:n] * (255 / 16)).astype(np.uint8)[:, None]
    return SampleStore.in_memory(x, digits.target[:n])


def _pairs(n: int = 256) -> SampleStore:
    from pipelines.sources import load_source

    raw = load_source("builtin:digits_pairs")
    return SampleStore.in_memory(raw.x[:n], raw.labels[:n], v=raw.v[:n])


@pytest.mark.parametrize("loss,precision", [("infonce", "bf16"), ("infonce", "fp16"), ("sscl", "bf16"),
                                            ("mveb", "bf16"), ("soft_infonce", "bf16"), ("clip", "fp16")])
def test_each_task_steps_and_evaluates_on_the_gpu(loss, precision):
    store = _pairs() if loss == "clip" else _digits()
    kind = {"mveb": "ema", "soft_infonce": "classifier", "clip": "bimodal"}.get(loss, "siamese")
    spec = network_spec(kind, SMALL, store.sample_shape, v_shape=store.v_shape if kind == "bimodal" else None,
                        num_classes=10 if kind == "classifier" else None)
    hyper = {"noise": [0.1] * 10} if loss == "soft_infonce" else {}
    task = build_task(spec, LOSSES[loss](**hyper), precision=precision, channels_last=True)
    torch.manual_seed(0)
    model = prepare_network(task, {"channels_last": True}, lambda m: m.to(CUDA))
    task.loss_fn.to(CUDA)
    task.attach(model)
    stepper = Stepper(torch.optim.AdamW(model.parameters(), lr=1e-3), precision, CUDA)
    assert stepper.scaler.is_enabled() == (precision == "fp16")
    rng = np.random.default_rng(0)
    for step in range(5):
        loss_value, extras = task.step_loss(model, store, rng.choice(store.size, 32, replace=False), CUDA)
        assert loss_value.device.type == "cuda" and loss_value.dtype == torch.float32
        stepper.step(loss_value)
        task.after_step(model, (step + 1) / 5)
        assert np.isfinite(loss_value.item()) and all(np.isfinite(v) for v in extras.values())
    plans = rng.choice(store.size, (2, 1, 32))
    metrics = task.evaluate(model, store, store, plans, final=True)  # the model stays on the GPU
    assert next(model.parameters()).device.type == "cuda"
    assert metrics and all(np.isfinite(v) for v in metrics.values()), metrics


def test_cross_rank_mean_runs_on_nccl(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert mean_across_ranks(3.5, CUDA) == 3.5
    finally:
        dist.destroy_process_group()


def test_a_gpu_checkpoint_loads_in_a_process_without_a_gpu(tmp_path):
    spec = network_spec("siamese", {"backbone": "resnet18"}, (3, 32, 32))
    task = build_task(spec, LOSSES["infonce"](), precision="bf16")
    model = prepare_network(task, {}, lambda m: m.to(CUDA))
    save_network(model, spec, tmp_path)
    code = ("import sys, torch; from trainers.models import Encoder, load_network; "
            "net, _ = load_network(sys.argv[1]); assert Encoder(net)(torch.rand(2, 3, 32, 32)).shape == (2, 512)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_embedding_actor_code_uses_the_gpu(tmp_path):
    from pipelines.embed import Embedder  # imports Ray: the only test here that needs it

    store = _digits(64)
    spec = network_spec("siamese", SMALL, store.sample_shape)
    save_network(prepare_network(build_task(spec, LOSSES["infonce"]()), {}), spec, tmp_path)
    embedder = Embedder(str(tmp_path), spec, store)  # device "auto": the visible GPU
    assert embedder.device.type == "cuda"
    out = embedder({"id": np.arange(8), "store_id": np.arange(8)})
    assert out["embedding"].shape == (8, 16) and np.allclose(np.linalg.norm(out["embedding"], axis=1), 1, atol=1e-4)
