"""Argument checks shared by the public ops: each error names the argument and what was expected."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

try:
    from numpy import bool_ as _numpy_bool  # np.True_ is no bool (or Integral); NumPy 2 names it "bool"
except ImportError:  # numpy is optional
    _numpy_bool = bool


def logdet_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-dets are accumulated and returned in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor(name: str, value, *, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have a batch dimension (at least {min_dim}-D), got shape {tuple(value.shape)}")
    return value


def like(name: str, value, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """`value` must be a tensor with ref's shape, dtype and device."""
    tensor(name, value)
    if value.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(value.shape)}")
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {value.dtype}")
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")
    return value


def running_logdet(logdet: Optional[torch.Tensor], ref: torch.Tensor) -> Optional[torch.Tensor]:
    """Validates the running log-det a caller passes: shape (batch,), on ref's device."""
    if logdet is None:
        return None
    if not isinstance(logdet, torch.Tensor):
        raise TypeError(f"logdet must be a torch.Tensor or None, got {type(logdet).__name__}")
    if not logdet.is_floating_point():
        raise TypeError(f"logdet must be a floating-point tensor, got dtype {logdet.dtype}")
    if logdet.shape != (ref.shape[0],):
        raise ValueError(f"logdet must have shape (batch,) = ({ref.shape[0]},), got {tuple(logdet.shape)}")
    if logdet.device != ref.device:
        raise ValueError(f"logdet is on {logdet.device} but x is on {ref.device}")
    return logdet.to(logdet_dtype(ref.dtype)).contiguous()


def choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")


def flag(name: str, value) -> bool:
    """A bool option (True/False, or an integer 0/1): a string such as "no" must not read as True."""
    if isinstance(value, (bool, _numpy_bool)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def positive(name: str, value) -> float:
    if isinstance(value, (str, bytes, bool)):  # float("2") would parse; True would read as 1
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int such as 10**400: beyond float, as inf
        raise ValueError(f"{name} must be a positive finite number, got a number too large for a float") from None
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def per_channel(name: str, value, x: torch.Tensor) -> torch.Tensor:
    """`value` must be a (C,) tensor with C = x.shape[1], on x's device, with x's dtype."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    channels = x.shape[1]
    if value.shape != (channels,):
        raise ValueError(f"{name} must have shape (C,) = ({channels},) to match x.shape[1], got {tuple(value.shape)}")
    if value.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {value.dtype}")
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}")
    return value


def channel_input(x) -> torch.Tensor:
    """x must be a floating-point (B, C) or (B, C, *spatial) tensor."""
    tensor("x", x, min_dim=2)
    return x
