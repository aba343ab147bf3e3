"""Backbones, precision and device plumbing (issue 13): every backbone trains a step and has the
documented widths; bad sizes are refused; bf16 trains; the losses stay fp32 under autocast; the loop's
pieces use the device they are given."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipelines.config import ConfigError, check_model, load_config
from pipelines.datasets import SampleStore
from trainers.device import Stepper, mean_across_ranks, prepare_network
from trainers.losses import LOSSES
from trainers.models import (
    Encoder,
    build_network,
    encoder_card,
    load_network,
    network_spec,
    resolve_model,
    save_network,
)
from trainers.tasks import build_task

# (backbone, image side, feature width): the smallest sizes each takes, to keep the test cheap
CASES = [("small_cnn", 8, 128), ("resnet18", 16, 512), ("resnet50", 16, 2048), ("vit_b_16", 32, 768)]


@pytest.mark.parametrize("backbone,side,width", CASES)
@pytest.mark.parametrize("channels", [3, 1])
def test_every_backbone_trains_a_step_with_the_documented_widths(backbone, side, width, channels):
    torch.manual_seed(0)
    spec = network_spec("siamese", {"backbone": backbone, "proj_dim": 24}, (channels, side, side))
    assert spec["model"]["embed_dim"] == width
    assert spec["model"]["proj_hidden"] == (256 if backbone == "small_cnn" else width)  # follows the features
    net = build_network(spec)
    x = torch.rand(4, channels, side, side)
    h, z = net(x)
    assert h.shape == (4, width) and z.shape == (4, 24)
    assert net.graph_embedding(x).shape == (4, 24)  # the graph is built in the loss space
    assert encoder_card(spec)["embedding_dim"] == width == Encoder(net)(x).shape[1]
    loss = LOSSES["infonce"]()(*z.chunk(2))
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    first = next(p for p in net.parameters() if p.dim() == 4)  # the stem's conv sees every input channel
    assert first.shape[1] == channels


def test_cifar_stem_keeps_a_spatial_map_at_the_last_stage():
    maps = {}
    for stem in (True, False):
        net = build_network(network_spec("siamese", {"backbone": "resnet18", "cifar_stem": stem}, (3, 32, 32)))
        net.encoder.layer4.register_forward_hook(lambda m, i, out, stem=stem: maps.__setitem__(stem, out.shape))
        net.eval()(torch.rand(1, 3, 32, 32))
    assert maps[True][-2:] == (4, 4)  # 32 / 8: stride 1 stem, no max-pool
    assert maps[False][-2:] == (1, 1)  # 32 / 32: ImageNet stem
    assert resolve_model({"backbone": "resnet18"}, (3, 64, 64))["cifar_stem"] is True  # default by size
    assert resolve_model({"backbone": "resnet18"}, (3, 96, 96))["cifar_stem"] is False


@pytest.mark.parametrize("model,shape,words", [
    ({"backbone": "vit_b_16"}, (3, 8, 8), "multiple of 16"),
    ({"backbone": "vit_b_16"}, (3, 40, 40), "multiple of 16"),
    ({"backbone": "resnet18", "cifar_stem": False}, (3, 16, 16), "model.cifar_stem = true"),
    ({"backbone": "resnet50", "embed_dim": 128}, (3, 32, 32), "gives 2048 features"),
    ({"backbone": "alexnet"}, (3, 32, 32), "allowed: small_cnn, resnet18, resnet50, vit_b_16"),
])
def test_sizes_a_backbone_cannot_take_are_refused(model, shape, words):
    with pytest.raises(ValueError, match=words):
        resolve_model(model, shape)


def test_config_refusals_name_the_field_and_the_allowed_values():
    with pytest.raises(ConfigError, match="model.backbone.*resnet18"):
        load_config(None, ["model.backbone=resnet19"])
    with pytest.raises(ConfigError, match="train.precision = 'fp16' needs train.use_gpu"):
        load_config(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="model.cifar_stem = true: model.backbone = 'vit_b_16'"):
        load_config(None, ["model.backbone=vit_b_16", "model.cifar_stem=true"])
    with pytest.raises(ConfigError, match="model.embed_dim = 64: model.backbone = 'resnet18' gives 512"):
        load_config(None, ["model.backbone=resnet18", "model.embed_dim=64"])
    config = load_config(None, ["model.backbone=vit_b_16"])
    with pytest.raises(ConfigError, match=r"multiple of 16.*builtin:digits.*\(1, 8, 8\)"):
        check_model(config, (1, 8, 8))  # what run() calls once the data is listed, before Ray
    check_model(load_config(None, ["model.backbone=resnet18"]), (1, 8, 8))  # the CIFAR stem takes 8 px


def _digits_store(n: int = 256) -> SampleStore:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:n] * (255 / 16)).astype(np.uint8)[:, None]
    return SampleStore.in_memory(x, digits.target[:n])


@pytest.mark.parametrize("loss", ["infonce", "sscl", "mveb"])
def test_loss_outputs_are_fp32_under_autocast_and_match_fp32(loss):
    torch.manual_seed(0)
    fn = LOSSES[loss]()
    z_a, z_b = torch.randn(16, 8), torch.randn(16, 8)
    kwargs = {"targets": (z_a.roll(1, 0), z_b.roll(1, 0))} if loss == "mveb" else {}
    half = {k: tuple(t.bfloat16() for t in v) for k, v in kwargs.items()}
    torch.manual_seed(1)  # sscl draws its synthetic negatives at random: the same draws both times
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(z_a.bfloat16(), z_b.bfloat16(), **half)
    assert out.dtype == torch.float32
    # the same bf16-rounded inputs, computed in fp32 outside autocast: the same value
    torch.manual_seed(1)
    reference = fn(z_a.bfloat16().float(), z_b.bfloat16().float(),
                   **{k: tuple(t.float() for t in v) for k, v in half.items()})
    assert torch.allclose(out, reference, rtol=1e-6, atol=1e-6)


def test_bf16_trains_on_cpu_with_a_falling_loss():
    store = _digits_store()
    spec = network_spec("siamese", {"width": 8, "embed_dim": 32, "proj_hidden": 64, "proj_dim": 16},
                        store.sample_shape)
    task = build_task(spec, LOSSES["infonce"](temperature=0.2), precision="bf16", channels_last=True)
    torch.manual_seed(0)
    model = prepare_network(task, {"channels_last": True})
    assert model.encoder.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    stepper = Stepper(torch.optim.AdamW(model.parameters(), lr=3e-3), "bf16", torch.device("cpu"))
    assert not stepper.scaler.is_enabled()  # bf16 needs no scaler
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        loss, _ = task.step_loss(model, store, rng.choice(store.size, 64, replace=False), torch.device("cpu"))
        assert loss.dtype == torch.float32
        stepper.step(loss)
        losses.append(loss.item())
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.3, losses


def test_the_step_runs_on_the_device_it_is_given():
    """Every input of a step goes to the given device: on the meta device (shapes only) a tensor left on
    the CPU would raise a device mismatch."""
    store = _digits_store(64)
    spec = network_spec("siamese", {"width": 8, "embed_dim": 16, "proj_hidden": 16, "proj_dim": 8},
                        store.sample_shape)
    task = build_task(spec, LOSSES["infonce"](), channels_last=True)  # autocast has no meta device
    meta = torch.device("meta")
    model = task.build().to(meta)
    batch = task.batch_maker(store).make(store, np.arange(32), seed=0)
    loss, _ = task.batch_loss(model, batch, meta)
    assert loss.device == meta and loss.dtype == torch.float32 and loss.requires_grad


def test_mean_across_ranks_reduces_on_the_given_device(tmp_path):
    assert mean_across_ranks(2.5, torch.device("cpu")) == 2.5  # no process group: the value itself
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert mean_across_ranks(2.5, torch.device("cpu")) == 2.5
        with pytest.raises(Exception):  # the tensor is made on the given device: gloo cannot reduce meta
            mean_across_ranks(2.5, torch.device("meta"))
    finally:
        dist.destroy_process_group()


def test_checkpoints_are_device_independent_and_rebuild_in_a_fresh_process(tmp_path):
    spec = network_spec("siamese", {"backbone": "resnet18"}, (3, 16, 16))
    torch.manual_seed(0)
    net = build_network(spec).eval()
    save_network(net, spec, tmp_path)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in state.values())
    assert json.loads((tmp_path / "network.json").read_text())["model"]["backbone"] == "resnet18"
    x = torch.rand(3, 3, 16, 16)
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        np.save(tmp_path / "h.npy", Encoder(net)(x).numpy())
    code = ("import sys, numpy as np, torch; from trainers.models import Encoder, load_network; "
            "net, spec = load_network(sys.argv[1]); x = torch.from_numpy(np.load(sys.argv[1] + '/x.npy')); "
            "h = Encoder(net)(x).detach().numpy(); ref = np.load(sys.argv[1] + '/h.npy'); "
            "assert spec['x_shape'] == (3, 16, 16); assert np.allclose(h, ref, atol=1e-5), abs(h - ref).max()")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_unwrap_strips_compile_and_ddp_wrappers_before_saving(tmp_path):
    spec = network_spec("siamese", {"width": 4, "embed_dim": 8, "proj_hidden": 8, "proj_dim": 4}, (1, 8, 8))
    net = build_network(spec)
    compiled = torch.compile(net)  # wrapping only; nothing is compiled until it is called
    save_network(compiled, spec, tmp_path)
    loaded, _ = load_network(tmp_path)  # keys without the "_orig_mod." prefix
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k



def test_compiled_network_trains_the_same_steps_as_eager():
    """``train.compile``: torch.compile (inductor, C++ on the CPU) gives the losses of the eager network."""
    store = _digits_store(96)
    spec = network_spec("siamese", {"width": 4, "embed_dim": 8, "proj_hidden": 16, "proj_dim": 8}, store.sample_shape)
    task = build_task(spec, LOSSES["infonce"]())
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = prepare_network(task, {"compile": compiled})
        assert hasattr(model, "_orig_mod") == compiled
        stepper = Stepper(torch.optim.AdamW(model.parameters(), lr=1e-2), "fp32", torch.device("cpu"))
        losses[compiled] = []
        for step in range(3):
            torch.manual_seed(100 + step)  # the same views both times
            loss, _ = task.step_loss(model, store, np.arange(32 * step, 32 * step + 32), torch.device("cpu"))
            stepper.step(loss)
            losses[compiled].append(loss.item())
    assert np.allclose(losses[True], losses[False], rtol=1e-3, atol=1e-4), losses


@pytest.mark.parametrize("loss", ["sscl", "mveb", "soft_infonce", "joint"])
def test_every_loss_family_steps_and_evaluates_with_a_torchvision_backbone(loss):
    """Each task shape (siamese, ema, classifier, bimodal: one loss of each; the others of a shape run the
    same network code) with resnet18 (CIFAR stem) on 8x8 digits."""
    from pipelines.sources import load_source

    paired = loss in ("clip", "conditional", "joint")
    raw = load_source("builtin:digits_pairs" if paired else "builtin:digits")
    store = SampleStore.in_memory(raw.x[:96], raw.labels[:96], v=raw.v[:96] if paired else None)
    kind = {"mveb": "ema", "soft_infonce": "classifier"}.get(loss, "bimodal" if paired else "siamese")
    spec = network_spec(kind, {"backbone": "resnet18", "proj_dim": 16}, store.sample_shape,
                        v_shape=store.v_shape if paired else None, num_classes=10 if kind == "classifier" else None)
    task = build_task(spec, LOSSES[loss](**({"noise": [0.1] * 10} if loss == "soft_infonce" else {})),
                      eval_cfg={"max_train_samples": 64})
    torch.manual_seed(0)
    model = prepare_network(task, {})
    task.attach(model)
    stepper = Stepper(torch.optim.AdamW(model.parameters(), lr=1e-3), "fp32", torch.device("cpu"))
    loss_value, _ = task.step_loss(model, store, np.arange(16), torch.device("cpu"))
    stepper.step(loss_value)
    task.after_step(model, 0.5)
    metrics = task.evaluate(model, store, store, np.arange(32).reshape(2, 1, 16), final=False)
    assert np.isfinite(loss_value.item()) and metrics and all(np.isfinite(v) for v in metrics.values()), metrics
