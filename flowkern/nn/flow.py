"""The layer protocol, the base distribution and Flow, the composition of layers.

Every flowkern layer maps data -> latent in forward(x, context=None, logdet=None) and
latent -> data in inverse(z, context=None, logdet=None); both return (output, logdet), where
logdet (B,) is the running log|det J| of the direction taken, added to the `logdet` passed in
(the fused ops add it in their own reduction, so a flow does no extra pass per layer).
Unconditional layers ignore `context`.
"""
from __future__ import annotations

import math
import operator
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..ops.gaussian_nll import gaussian_nll

Shape = Union[int, Sequence[int]]


def _count(name: str, n) -> int:
    """n as a non-negative Python int (numpy and 0-d integer tensors too, as operator.index
    takes them; not bools or floats)."""
    try:
        value = operator.index(n) if not isinstance(n, bool) else None
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return value


def _check_context_type(context) -> None:
    if context is not None and not isinstance(context, torch.Tensor):
        raise TypeError(f"context must be a tensor (or None), got {type(context).__name__}")


def check_layer_context(context, width: int, batch: int) -> None:
    """A conditional layer's context (width > 0): a tensor of shape (batch, width)."""
    if context is None:
        raise ValueError(f"this layer is conditional: pass context of shape (batch, {width})")
    if not isinstance(context, torch.Tensor) or context.shape != (batch, width):
        got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"context must have shape ({batch}, {width}), got {got}")


class FlowLayer(nn.Module):
    """Base class of flowkern's invertible layers."""

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, z: torch.Tensor, context: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class StandardNormal(nn.Module):
    """N(0, I) over events of `shape`; sample(n, temperature) draws from N(0, temperature^2 I)."""

    def __init__(self, shape: Shape):
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        if not self.shape or any(s <= 0 for s in self.shape):
            raise ValueError(f"shape must be positive sizes, got {shape!r}")
        self.dim = math.prod(self.shape)
        # A buffer only to follow the module's device and dtype.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def _check_shape(self, z: torch.Tensor) -> torch.Tensor:
        """z must be (batch, *shape)."""
        if tuple(z.shape[1:]) != self.shape:
            raise ValueError(f"z must have shape (batch, {', '.join(map(str, self.shape))}), got {tuple(z.shape)}")
        return z

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) per row, (B,): float32 (float64 for float64 z; half z sums in float32)."""
        return -gaussian_nll(self._check_shape(z))

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        n = _count("n", n)
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        z = torch.randn((n, *self.shape), device=self._anchor.device, dtype=self._anchor.dtype)
        return z * temperature


class Flow(nn.Module):
    """A normalizing flow: layers applied in order map data to latent, then a base density.

    forward(x) -> (z, logdet); inverse(z) -> (x, logdet of the inverse map);
    log_prob(x) = base.log_prob(z) + logdet; sample(n, temperature) inverts base samples.

    memory_saving=True: forward (so log_prob and bits_per_dim) keeps no intermediate
    activations for backprop; the backward pass rebuilds each layer's input with its exact
    inverse and recomputes the layer (flowkern.nn.memory): activation memory independent of
    depth, for about one more forward and one inverse per step. memory_saving=k (an int >= 1)
    also keeps every k-th layer's input, so rounding error in the rebuilt inputs never
    accumulates over more than k layers (for inverses that amplify it, like steep splines).
    The attribute `memory_saving` can be switched at any time; it changes no parameter or
    state-dict key.

    embedding: a module the context goes through once per call (forward, inverse, log_prob,
    bits_per_dim, sample) before any layer sees it, trained with the flow (sbi's
    embedding_net): the layers' `context` width is then the embedding's output width.
    """

    def __init__(self, layers: Iterable[nn.Module], base: Optional[nn.Module] = None, *,
                 memory_saving: Union[bool, int] = False, embedding: Optional[nn.Module] = None):
        super().__init__()
        if embedding is not None and not isinstance(embedding, nn.Module):
            raise TypeError(f"embedding must be an nn.Module (or None), got {type(embedding).__name__}")
        self.embedding = embedding
        if not isinstance(memory_saving, bool) and (not isinstance(memory_saving, int) or memory_saving < 1):
            raise TypeError(f"memory_saving must be a bool or a positive int (keep every k-th layer's input), "
                            f"got {memory_saving!r}")
        self.memory_saving = memory_saving
        self.layers = nn.ModuleList(layers)
        if len(self.layers) == 0:
            raise ValueError("a Flow needs at least one layer")
        if base is None:
            features = getattr(self.layers[0], "features", None)
            if features is None:
                raise ValueError("pass base=... (the first layer does not say its number of features)")
            base = StandardNormal(features)
        self.base = base

    def embed(self, context: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The context as the layers see it: embedding(context), or the context itself."""
        if context is None or self.embedding is None:
            return context
        return self.embedding(context)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._forward(x, self.embed(context))

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.memory_saving:
            from .memory import memory_saving_forward

            keep = None if self.memory_saving is True else self.memory_saving
            return memory_saving_forward(self.layers, x, context, keep_every=keep)
        logdet = None
        for layer in self.layers:
            x, logdet = layer(x, context, logdet)
        return x, logdet

    def inverse(self, z: torch.Tensor, context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._inverse(z, self.embed(context))

    def _inverse(self, z: torch.Tensor, context: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        logdet = None
        for layer in reversed(self.layers):
            z, logdet = layer.inverse(z, context, logdet)
        return z, logdet

    def _standard_normal_base(self) -> bool:
        """Whether the base is StandardNormal's density (not a subclass that redefines it)."""
        return isinstance(self.base, StandardNormal) and type(self.base).log_prob is StandardNormal.log_prob

    def _event_dims(self) -> Optional[int]:
        shape = getattr(self.base, "shape", None)
        return len(shape) if isinstance(shape, tuple) else None

    def log_prob(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p(x) per row, shape (B,), float32 (float64 for float64 input).

        = base.log_prob(z) + logdet; with a StandardNormal base, -gaussian_nll(z, logdet): one
        fused reduction over z instead of square, sum and two adds.

        Batched contexts (the layout of sample): x of shape (n, M, *event) against a context of
        M rows, (M, C) (or (M, ...) with an embedding), scores x[i, m] under context m and
        returns (n, M). It is taken to be batched when x has one dim more than the base's event
        and its second dim is the context's row count while its first is not (or both are M):
        a flow whose layers change the number of dims (its input (B, *in) with len(in) = len(event)
        + 1) passes such x one row per context. A context of shape (C,) applies to every row.
        """
        _check_context_type(context)
        event = self._event_dims()
        if (context is not None and isinstance(x, torch.Tensor) and event is not None and context.dim() >= 2
                and x.dim() == event + 2 and x.shape[1] == context.shape[0]
                and (x.shape[0] != context.shape[0] or x.shape[0] == x.shape[1])):
            n, m = x.shape[:2]
            e = self._repeat(self.embed(context), n, context)  # embedded once per context row
            return self._log_prob(x.reshape(n * m, *x.shape[2:]), e).view(n, m)
        if context is not None and context.dim() == 1 and isinstance(x, torch.Tensor):
            e = self.embed(context[None])
            return self._log_prob(x, e.expand(x.shape[0], *e.shape[1:]))
        return self._log_prob(x, self.embed(context))

    def _repeat(self, e: torch.Tensor, n: int, context: torch.Tensor) -> torch.Tensor:
        """(M, C) -> (n * M, C), row i * M + m = e[m]; e is the embedded context."""
        if e.dim() != 2:
            after = " after the embedding" if self.embedding is not None else ""
            raise ValueError(f"context must give the layers (M, C) rows{after}: context {tuple(context.shape)} "
                             f"gave {tuple(e.shape)}")
        return e.unsqueeze(0).expand(n, *e.shape).reshape(n * e.shape[0], *e.shape[1:])

    def _log_prob(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        z, logdet = self._forward(x, context)
        if self._standard_normal_base():
            return -gaussian_nll(self.base._check_shape(z), logdet)
        return self.base.log_prob(z) + logdet

    def bits_per_dim(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample bits/dim of 8-bit data: x holds pixel values 0..255 (an integer tensor).

        The flow must start with flowkern.nn.Dequantize (the models' dequantize=True), which
        adds uniform noise and maps to [0, 1) with its log-det, so log_prob(x) is the
        dequantized log-density on the pixel scale, and -log_prob / (D ln 2), its Theis et al.
        bound, is the number papers report. A fresh noise draw each call: average over calls
        (or batches) for the expectation.
        """
        from .preprocess import Dequantize, bits_per_dim

        if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"bits_per_dim takes 8-bit pixels as an integer tensor (e.g. torch.uint8), got {got}")
        if not isinstance(self.layers[0], Dequantize):
            raise ValueError("bits_per_dim needs a flow whose first layer is flowkern.nn.Dequantize "
                             "(build the model with dequantize=True)")
        dims = math.prod(x.shape[1:])
        if self._standard_normal_base():
            z, logdet = self(x, context)
            if math.prod(z.shape[1:]) == dims:  # a bijection keeps the count; divide by it in the kernel
                return gaussian_nll(self.base._check_shape(z), logdet, bits_per_dim=True)
            return bits_per_dim(-gaussian_nll(self.base._check_shape(z), logdet), dims)
        return bits_per_dim(self.log_prob(x, context), dims)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """n samples (n, *event); with a context, torch.distributions' layout:

        - context (M, C) (with an embedding, (M, ...) as it takes them): n samples under each of
          the M contexts in one pass, (n, M, *event), sample [i, m] drawn under context m. One
          sample per context row: sample(1, c)[0], (M, *event).
        - context (C,), a single vector context: (n, *event).

        (Until this change a context of n rows gave one sample per row, (n, *event).) The
        context goes through the flow's embedding once per row, before it is repeated.
        """
        n = _count("n", n)
        _check_context_type(context)
        if context is None:
            return self._inverse(self.base.sample(n, temperature), None)[0]
        if context.dim() == 0:
            raise ValueError("context must have shape (M, C) (or (C,) for one vector context), got a scalar")
        single = context.dim() == 1
        e = self.embed(context[None] if single else context)
        m = e.shape[0]
        x, _ = self._inverse(self.base.sample(n * m, temperature), self._repeat(e, n, context))
        x = x.view(n, m, *x.shape[1:])
        return x[:, 0] if single else x
