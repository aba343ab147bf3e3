"""Shared pieces of the loss modules: validation helpers and the module base class."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, ClassVar, Iterable, Mapping

import torch
from torch import nn

EPS = 1e-12


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation ``x / max(||x||, 1e-12)``.

    Shape:
        x: ``[..., D]``; returns the same shape.
    """
    return nn.functional.normalize(x, dim=-1, eps=EPS)


def check_positive(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_non_negative(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_range(name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``low <= value <= high`` (``< high`` if ``high_open``)."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and low <= value
        and (value < high if high_open else value <= high)
    )
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def check_pair(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``z_a`` and ``z_b`` are 2-D with the same shape."""
    if z_a.dim() != 2 or z_a.shape != z_b.shape:
        raise ValueError(
            f"z_a and z_b must both be [B, D] with the same shape, got {tuple(z_a.shape)} "
            f"and {tuple(z_b.shape)}"
        )


def _upcast(value: Any) -> Any:
    """fp16/bf16 tensors (also inside tuples and lists) as fp32; anything else as it is."""
    if torch.is_tensor(value):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, (tuple, list)):
        return type(value)(_upcast(v) for v in value)
    return value


def _tensors(args: tuple, kwargs: dict) -> Iterable[torch.Tensor]:
    for value in (*args, *kwargs.values()):
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if torch.is_tensor(item):
                yield item


class ContrastiveLoss(nn.Module):
    """Base class of the registry losses.

    Subclasses keep every constructor argument as an attribute of the same name and validate it
    in ``__init__``. The contract is ``forward(z_a, z_b, targets=None) -> scalar tensor``.

    Attributes:
        name: registry key.
        distributed_flags: names of the constructor arguments that change what is gathered
            across ranks (logged as MLflow params together with the rest of :meth:`hparams`).
    """

    name: ClassVar[str] = ""
    distributed_flags: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def params(cls) -> dict[str, Any]:
        """Hyper-parameter names and their defaults, in constructor order."""
        signature = inspect.signature(cls.__init__)
        return {
            name: p.default
            for name, p in signature.parameters.items()
            if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None = None) -> "ContrastiveLoss":
        """Build from a config ``loss:`` section (without its ``name`` key).

        Unknown keys raise ``ValueError`` naming the closest valid key; values are validated by
        the constructor. Call this on the driver before any worker starts.
        """
        section = dict(section or {})
        allowed = cls.params()
        for key in section:
            if key not in allowed:
                close = difflib.get_close_matches(key, list(allowed), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"unknown hyper-parameter {key!r} for loss {cls.name!r}{hint} "
                    f"(allowed: {sorted(allowed)})"
                )
        return cls(**section)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``forward`` in fp32 whatever the caller's precision: half-precision inputs (bf16/fp16
        outputs of an autocast forward pass) are cast up and autocast is off inside, so the
        log-sum-exps, the normalisations and the gathered similarity matrices never round to 8 bits
        of mantissa."""
        args = tuple(_upcast(a) for a in args)
        kwargs = {k: _upcast(v) for k, v in kwargs.items()}
        device = next((t.device.type for t in _tensors(args, kwargs)), "cpu")
        if not torch.amp.is_autocast_available(device):  # e.g. the meta device: nothing to turn off
            return super().__call__(*args, **kwargs)
        with torch.autocast(device_type=device, enabled=False):
            return super().__call__(*args, **kwargs)

    def hparams(self) -> dict[str, Any]:
        """Current hyper-parameters and flags (e.g. to log as MLflow params)."""
        return {name: getattr(self, name) for name in self.params()}

    def extra_repr(self) -> str:  # noqa: D102
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
