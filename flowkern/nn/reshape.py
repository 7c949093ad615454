"""Volume-preserving reshapes for multi-scale image flows: Squeeze / Unsqueeze (space-to-depth
and back) and Split, which factors out half of the channels early (RealNVP, Glow)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import _checks
from .flow import FlowLayer
from .linear import _check_size, _zero_logdet


def _check_image(name: str, x, layer: str) -> None:
    _checks.tensor(name, x, min_dim=2)
    if x.dim() != 4:
        raise ValueError(f"{layer}: {name} must have shape (batch, C, H, W), got {tuple(x.shape)}")


def space_to_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C*f*f, H/f, W/f); output channel c*f*f + i*f + j holds x[:, c, i::f, j::f]
    (the order of torch.nn.functional.pixel_unshuffle and of Glow's squeeze2d)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, c * factor * factor, h // factor, w // factor)


def depth_to_space(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The exact inverse of space_to_depth: (B, C*f*f, H, W) -> (B, C, H*f, W*f)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // (factor * factor), factor, factor, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c // (factor * factor), h * factor, w * factor)


class _Reshape(FlowLayer):
    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = _check_size("factor", factor)

    def _squeeze(self, name: str, x: torch.Tensor) -> torch.Tensor:
        _check_image(name, x, type(self).__name__)
        f = self.factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"{type(self).__name__}(factor={f}): {name} must have H and W divisible by {f}, "
                             f"got shape {tuple(x.shape)}")
        return space_to_depth(x, f)

    def _unsqueeze(self, name: str, x: torch.Tensor) -> torch.Tensor:
        _check_image(name, x, type(self).__name__)
        f = self.factor
        if x.shape[1] % (f * f):
            raise ValueError(f"{type(self).__name__}(factor={f}): {name} must have a number of channels "
                             f"divisible by {f * f}, got shape {tuple(x.shape)}")
        return depth_to_space(x, f)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class Squeeze(_Reshape):
    """Space-to-depth: (B, C, H, W) -> (B, C*f*f, H/f, W/f), each f x f block of pixels becoming
    f*f channels (channel c*f*f + i*f + j = pixel (i, j) of the block in channel c, as
    pixel_unshuffle). A permutation of the entries: log-det 0. Context is ignored."""

    def forward(self, x, context=None, logdet=None):
        return self._squeeze("x", x), _zero_logdet(x, logdet)

    def inverse(self, z, context=None, logdet=None):
        return self._unsqueeze("z", z), _zero_logdet(z, logdet)


class Unsqueeze(_Reshape):
    """Depth-to-space, the inverse of Squeeze as a layer of its own: its forward is
    Squeeze.inverse, (B, C*f*f, H, W) -> (B, C, H*f, W*f). log-det 0. Context is ignored."""

    def forward(self, x, context=None, logdet=None):
        return self._unsqueeze("x", x), _zero_logdet(x, logdet)

    def inverse(self, z, context=None, logdet=None):
        return self._squeeze("z", z), _zero_logdet(z, logdet)


class Split(FlowLayer):
    """Multi-scale factoring out: transforms the first half of the channels with `layers` and
    passes the second half through untouched.

    forward(x): x (B, C, ...) splits along dim 1 into x_kept = x[:, :ceil(C/2)] and
    x_out = x[:, ceil(C/2):]; y = cat([f(x_kept), x_out], dim=1), where f applies `layers` in
    order, each as layer(h, context, logdet) with the running log-det. inverse applies the
    layers' inverses in reverse order to the first part. Context goes to every inner layer.

    The inner layers must give back the kept part's shape overall (e.g. Squeeze, ..., Unsqueeze);
    a changed shape is an error. Since the factored-out half is never transformed again, it
    reaches the end of the flow unchanged and is scored by the one N(0, I) base over the whole
    latent: exactly the multi-scale architecture of RealNVP/Glow, whose factored-out variables
    are also standard normal. Use Flow(..., base=StandardNormal(event_shape)).
    """

    def __init__(self, *layers: nn.Module):
        super().__init__()
        if not layers:
            raise ValueError("Split needs at least one layer to transform the kept channels")
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Module) or not callable(getattr(layer, "inverse", None)):
                raise TypeError(f"layers[{i}] must be a flow layer (an nn.Module with inverse), "
                                f"got {type(layer).__name__}")
        self.layers = nn.ModuleList(layers)

    def _split(self, name: str, x: torch.Tensor):
        _checks.tensor(name, x, min_dim=2)
        if x.shape[1] < 2:
            raise ValueError(f"Split: {name} must have shape (batch, C, ...) with C >= 2, got {tuple(x.shape)}")
        kept = x.shape[1] - x.shape[1] // 2
        return x[:, :kept], x[:, kept:]

    @staticmethod
    def _check_kept(h: torch.Tensor, before: torch.Tensor, direction: str) -> None:
        if h.shape != before.shape:
            raise ValueError(f"Split: the inner layers must preserve the kept channels' shape, but their "
                             f"{direction} mapped {tuple(before.shape)} to {tuple(h.shape)} "
                             f"(end a Squeeze with an Unsqueeze inside the Split)")

    def forward(self, x, context=None, logdet: Optional[torch.Tensor] = None):
        kept, out = self._split("x", x)
        logdet = _checks.running_logdet(logdet, x)
        h = kept
        for layer in self.layers:
            h, logdet = layer(h, context, logdet)
        self._check_kept(h, kept, "forward")
        return torch.cat([h, out], dim=1), logdet

    def inverse(self, z, context=None, logdet: Optional[torch.Tensor] = None):
        kept, out = self._split("z", z)
        logdet = _checks.running_logdet(logdet, z)
        h = kept
        for layer in reversed(self.layers):
            h, logdet = layer.inverse(h, context, logdet)
        self._check_kept(h, kept, "inverse")
        return torch.cat([h, out], dim=1), logdet
