"""Registry: names, defaults, validation messages, config checking, and that training lowers each loss."""

from __future__ import annotations

import inspect

import pytest
import torch

from trainers.losses import LOSSES, ContrastiveLoss, build_loss, label_smoothing_targets

EXPECTED = {"infonce", "soft_infonce", "sscl", "mveb", "clip", "conditional", "joint"}

BAD_VALUES = {
    "infonce": [("temperature", -1), ("temperature", 0.0), ("gather", "yes")],
    "soft_infonce": [("temperature", -0.5), ("smoothing", 1.0), ("noise", [0.5, -0.5])],
    "sscl": [("temperature", 0), ("tau_plus", -0.1), ("beta", -2.0), ("n_hard", 0), ("n_synthetic", 1.5), ("mixing", "blend")],
    "mveb": [("lam", -0.01), ("eta", 0.0), ("min_width", 3.0), ("gather_score", 1)],
    "clip": [("temperature", -3), ("tilt", "manhattan"), ("weight", 1.5)],
    "conditional": [("direction", "sideways"), ("tilt", "dot"), ("temperature", -1e-3)],
    "joint": [("temperature", 0), ("include_diagonal", "no"), ("tilt", "")],
}


def test_registry_names() -> None:
    assert set(LOSSES) == EXPECTED
    assert all(issubclass(cls, ContrastiveLoss) and cls.name == name for name, cls in LOSSES.items())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_constructs_with_defaults_and_lists_params(name: str) -> None:
    cls = LOSSES[name]
    module = cls()
    params = cls.params()
    signature = inspect.signature(cls.__init__).parameters
    assert list(params) == [p for p in signature if p != "self"]
    assert module.hparams() == params
    assert set(cls.distributed_flags) <= set(params)
    assert all(params[flag] is False for flag in cls.distributed_flags)


@pytest.mark.parametrize("name,key,value", [(n, k, v) for n, bad in BAD_VALUES.items() for k, v in bad])
def test_rejects_bad_hyper_parameters(name: str, key: str, value) -> None:
    with pytest.raises(ValueError) as info:
        LOSSES[name](**{key: value})
    message = str(info.value)
    assert key in message and repr(value) in message


def test_message_format() -> None:
    with pytest.raises(ValueError, match=r"^temperature must be > 0, got -1$"):
        LOSSES["infonce"](temperature=-1)


def test_from_config_validates_keys() -> None:
    loss = build_loss("sscl", {"temperature": 0.2, "n_hard": 8})
    assert loss.temperature == 0.2 and loss.n_hard == 8
    with pytest.raises(ValueError, match="did you mean 'temperature'"):
        build_loss("infonce", {"temperture": 0.2})
    with pytest.raises(ValueError, match="must be one of"):
        build_loss("simclr")


class _TinyModel(torch.nn.Module):
    """Linear encoder of two noisy views; for soft_infonce also a linear class head."""

    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(8, 4)
        self.head = torch.nn.Linear(8, 3)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.3, generator=gen)


def _loss_of(name: str, loss: ContrastiveLoss, model: _TinyModel, target_model: _TinyModel, batch) -> torch.Tensor:
    x_a, x_b, labels = batch
    if name == "soft_infonce":
        return loss(model.head(x_a), None, label_smoothing_targets(labels, 3, 0.1))
    if name == "mveb":
        with torch.no_grad():
            targets = (target_model.encoder(x_a), target_model.encoder(x_b))
        return loss(model.encoder(x_a), model.encoder(x_b), targets)
    return loss(model.encoder(x_a), model.encoder(x_b))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_few_steps_lower_the_loss(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=gen)
    labels = torch.randint(3, (32,), generator=gen)
    x = x + 2.0 * torch.nn.functional.one_hot(labels, 8).float()
    batch = (x + 0.1 * torch.randn(32, 8, generator=gen), x + 0.1 * torch.randn(32, 8, generator=gen), labels)
    model = _TinyModel(gen)
    target_model = _TinyModel(gen)  # a fixed target network (an EMA copy with momentum 1)
    overrides = {"sscl": {"seed": 0, "n_hard": 8, "n_synthetic": 8}}
    loss = build_loss(name, overrides.get(name, {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with torch.no_grad():
        before = _loss_of(name, loss, model, target_model, batch).item()
    for _ in range(15):
        value = _loss_of(name, loss, model, target_model, batch)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        after = _loss_of(name, loss, model, target_model, batch).item()
    assert after < before
