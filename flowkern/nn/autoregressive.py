"""MADE and the masked autoregressive layers built on it: MAF (affine), autoregressive NSF
(rational-quadratic spline), and their inverse-autoregressive forms (IAF).

An autoregressive layer transforms feature i with parameters predicted from the features
before it in the layer's order: y_i = tau(x_i; theta_i(x_<i, context)). MADE (Germain et al.
2015) predicts every theta_i in one pass through masked linear layers. So the layer's density
direction is one MADE pass and one fused op (affine_coupling or rq_spline) over the whole row,
log-det fused; the other direction solves for one more feature per pass: D passes, each one
MADE pass and one fused op. inverse_autoregressive=True conditions on the output instead
(IAF, Kingma et al. 2016): one-pass sampling, D-pass density.

Why D passes are exact: pass k feeds the previous pass's output to MADE; the first k - 1
features (in the order) of that output are already right, so the parameters of the first k
are, and so are the first k features of pass k's output. Pass D's output is the solution and
pass D's parameters are its own, so pass D's log-det is the layer's. Under autograd the D
passes are unrolled; the dependence is triangular, so the unrolled derivative is the implicit
one exactly.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import _checks
from ..ops.rq_spline import check_bins, check_bound, rq_spline
from ..reference.affine_coupling import SCALES, identity_scale_raw
from ..reference.rq_spline import MIN_DERIVATIVE, identity_derivative_raw, params_per_element
from .flow import FlowLayer, check_layer_context
from .nets import Activation, _dropout, _size, activation_factory, draws_noise

ORDERS = ("natural", "reversed", "random")
LAYOUTS = ("param-major", "feature-major")


def input_degrees(features: int, order: Union[str, torch.Tensor]) -> torch.Tensor:
    """Degree 1..D of each feature: feature order[k] gets degree k + 1 (the k-th generated).

    order: "natural" (0, 1, ..., D-1), "reversed", "random" (torch's global RNG: seed it), or
    the features as a permutation of 0..D-1 (a tensor or a sequence of ints).
    """
    if isinstance(order, str):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS} or a permutation of 0..{features - 1}, got {order!r}")
        perm = {"natural": torch.arange(features), "reversed": torch.arange(features - 1, -1, -1),
                "random": torch.randperm(features) if order == "random" else None}[order]
    else:
        try:
            perm = torch.as_tensor(order)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"order must be a name or a permutation of 0..{features - 1}, "
                            f"got {type(order).__name__}") from None
        if (perm.dim() != 1 or perm.is_floating_point() or perm.dtype == torch.bool or perm.numel() != features
                or not torch.equal(torch.sort(perm).values, torch.arange(features))):
            raise ValueError(f"order must be a permutation of 0..{features - 1}, got {perm.tolist()}")
    degrees = torch.empty(features, dtype=torch.long)
    degrees[perm.long()] = torch.arange(1, features + 1)
    return degrees


class MaskedLinear(nn.Linear):
    """nn.Linear whose weight is multiplied by a fixed 0/1 mask (a buffer, in the state dict)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class _MaskedResidualBlock(nn.Module):
    """h + W2 act(W1 act(h)) with W1, W2 masked to degree >= (hidden units of equal degrees
    in and out: the residual keeps the autoregressive property); W2 starts at zero."""

    def __init__(self, mask: torch.Tensor, act, dropout: float):
        super().__init__()
        hidden = mask.shape[0]
        self.act1, self.act2 = act(), act()
        self.inner = MaskedLinear(hidden, hidden, mask)
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.outer = MaskedLinear(hidden, hidden, mask)
        nn.init.zeros_(self.outer.weight)
        nn.init.zeros_(self.outer.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = self.act2(self.inner(self.act1(h)))
        if self.dropout is not None:
            t = self.dropout(t)
        return h + self.outer(t)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation: out_features params for each of
    `features` inputs, output for feature i depending only on the features of lower degree
    (earlier in `order`) and on the context.

    Args:
        features: D, the input width.
        params: numbers predicted per feature (P); the output is (B, D * P).
        hidden: width of the hidden layers: hidden unit k has degree 1 + k mod (D - 1), or with
            a context k mod D (degree 0: the context alone). At least D - 1 (D with a context)
            for every allowed dependence to be reachable.
        layers: hidden layers (residual=False), or residual blocks (residual=True).
        context: width of a conditioning vector, fed through a plain linear layer into the first
            hidden layer (every output may depend on it).
        order: "natural", "reversed", "random" or a permutation of 0..D-1: the order in which
            features are generated (the degrees are a buffer: saved in the state dict).
        residual: pre-activation masked residual blocks (nflows' MADE with residual blocks).
        layout: "param-major": output unit p * D + i is param p of feature i (views (B, P, D));
            "feature-major": i * P + p ((B, D, P), the spline kernels' layout).
        activation, dropout: as flowkern.nn.MLP's.

    The output layer starts at zero (flow layers set its bias: identity at init).
    """

    def __init__(self, features: int, params: int, *, hidden: int = 50, layers: int = 2, context: int = 0,
                 order: Union[str, torch.Tensor] = "natural", residual: bool = False,
                 layout: str = "param-major", activation: Activation = "relu", dropout: float = 0.0):
        super().__init__()
        features, params = _size("features", features), _size("params", params)
        hidden, layers, context = _size("hidden", hidden), _size("layers", layers), _size("context", context, 0)
        _checks.choice("layout", layout, LAYOUTS)
        residual = _checks.flag("residual", residual)
        act, dropout = activation_factory(activation), _dropout(dropout)
        self.features, self.params, self.context_features, self.layout = features, params, context, layout
        self.register_buffer("degrees", input_degrees(features, order))
        deg = self.degrees
        # Hidden degrees, cyclic: 1..D-1, and with a context 0..D-1: degree-0 units see no input,
        # only the context, so that the first feature's parameters depend on the context too
        # (with degrees from 1 they would be biases alone).
        low = 0 if context else 1
        span = features - low
        h_deg = torch.arange(hidden) % span + low if span > 0 else torch.zeros(hidden, dtype=torch.long)
        if layout == "param-major":
            out_deg = deg.repeat(params)
        else:
            out_deg = deg.repeat_interleave(params)
        hidden_mask = h_deg[:, None] >= h_deg[None, :]
        self.first = MaskedLinear(features, hidden, h_deg[:, None] >= deg[None, :])
        self.context_layer = nn.Linear(context, hidden) if context else None
        self.activation = act()
        if residual:
            self.blocks = nn.ModuleList(_MaskedResidualBlock(hidden_mask, act, dropout) for _ in range(layers))
            self.hidden = None
        else:
            self.blocks = None
            mods = [nn.Dropout(dropout)] if dropout else []
            for _ in range(layers - 1):
                mods += [MaskedLinear(hidden, hidden, hidden_mask), act()] + ([nn.Dropout(dropout)] if dropout else [])
            self.hidden = nn.Sequential(*mods)
        self.last = MaskedLinear(hidden, features * params, out_deg[:, None] > h_deg[None, :])
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)

    @property
    def order(self) -> torch.Tensor:
        """The features in the order they are generated (argsort of the degrees)."""
        return torch.argsort(self.degrees)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.first(x)
        if self.context_layer is not None:
            if context is None:
                raise ValueError(f"this MADE is conditional: pass context of shape (batch, {self.context_features})")
            h = h + self.context_layer(context.to(h.dtype))
        if self.blocks is not None:
            for block in self.blocks:
                h = block(h)
            h = self.activation(h)
        else:
            h = self.hidden(self.activation(h))
        return self.last(h)

    def extra_repr(self) -> str:
        return f"features={self.features}, params={self.params}, context={self.context_features}"


class _Autoregressive(FlowLayer):
    """What MAF and the autoregressive spline share: the MADE, the checks, the one-pass and the
    D-pass directions. A subclass gives LAYOUT and _step(x, out, inverse, logdet)."""

    LAYOUT = "param-major"

    def __init__(self, features: int, params: int, *, hidden: int, layers: int, context: int, order,
                 inverse_autoregressive: bool, residual: bool, activation: Activation, dropout: float):
        super().__init__()
        self.features = _size("features", features)
        self.context_features = _size("context", context, 0)
        self.inverse_autoregressive = _checks.flag("inverse_autoregressive", inverse_autoregressive)
        self.made = MADE(features, params, hidden=hidden, layers=layers, context=context, order=order,
                         residual=residual, layout=self.LAYOUT, activation=activation, dropout=dropout)

    @property
    def stochastic(self) -> bool:
        """A dropout in the MADE, in training: memory-saving backprop replays the random stream."""
        return draws_noise(self.made)

    def _set_identity(self, bias: torch.Tensor) -> None:
        with torch.no_grad():
            self.made.last.bias.copy_(bias.flatten())

    def _check(self, name: str, x: torch.Tensor, context: Optional[torch.Tensor]) -> None:
        _checks.tensor(name, x, min_dim=2)
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"{name} must have shape (batch, {self.features}), got {tuple(x.shape)}")
        weight = self.made.first.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{name} must have the dtype of the layer's parameters ({weight.dtype}), got {x.dtype}: "
                            "cast the flow (e.g. flow.double()) or the data, or run under torch.autocast")
        if self.context_features:
            check_layer_context(context, self.context_features, x.shape[0])

    def _params(self, h: torch.Tensor, context: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return self.made(h, context if self.context_features else None).to(dtype)

    def _one_pass(self, x, context, logdet, inverse: bool):
        return self._step(x, self._params(x, context, x.dtype), inverse, logdet)

    def _solve(self, v, context, logdet, inverse: bool):
        """The D-pass direction: the output u with u = tau(v; theta(u)) (see the module doc)."""
        u = torch.zeros_like(v)
        for k in range(self.features):
            last = k == self.features - 1
            u, ld = self._step(v, self._params(u, context, v.dtype), inverse, logdet if last else None)
        return u, ld

    def forward(self, x, context=None, logdet=None):
        self._check("x", x, context)
        if self.inverse_autoregressive:  # theta from the output: solve, D passes
            return self._solve(x, context, logdet, inverse=False)
        return self._one_pass(x, context, logdet, inverse=False)

    def inverse(self, z, context=None, logdet=None):
        self._check("z", z, context)
        if self.inverse_autoregressive:  # theta from z itself: one pass
            return self._one_pass(z, context, logdet, inverse=True)
        return self._solve(z, context, logdet, inverse=True)

    def extra_repr(self) -> str:
        return (f"features={self.features}, context={self.context_features}, "
                f"inverse_autoregressive={self.inverse_autoregressive}")


class MaskedAutoregressiveAffine(_Autoregressive):
    """MAF's layer: y_i = x_i * m_i + t_i with (t_i, raw scale_i) = MADE(x_<i, context), the
    fused affine op with its log-det; inverse_autoregressive=True is IAF's layer.

    Args:
        features: D.
        hidden, layers, residual, activation, dropout: the MADE's (see MADE).
        context: width of a conditioning vector (0: unconditional).
        scale, clamp: the affine op's scale function ("tanh": zuko's and FrEIA's soft-clamped
            exp; "sigmoid": nflows' MaskedAffineAutoregressiveTransform's, sbi's maf; "exp").
        order: the order of the features (see MADE); stack layers with Permutation between them.
        inverse_autoregressive: condition on the output (IAF): one-pass sampling, D-pass density.
    Starts as the identity (the MADE's output layer zero, its bias at m = 1).
    """

    def __init__(self, features: int, hidden: int = 50, *, layers: int = 2, context: int = 0, scale: str = "tanh",
                 clamp: float = 2.0, order: Union[str, torch.Tensor] = "natural",
                 inverse_autoregressive: bool = False, residual: bool = False, activation: Activation = "relu",
                 dropout: float = 0.0):
        _checks.choice("scale", scale, SCALES)
        super().__init__(features, 2, hidden=hidden, layers=layers, context=context, order=order,
                         inverse_autoregressive=inverse_autoregressive, residual=residual, activation=activation,
                         dropout=dropout)
        self.scale, self.clamp = scale, _checks.positive("clamp", clamp)
        identity = torch.zeros(2, self.features)
        identity[1] = identity_scale_raw(scale)
        self._set_identity(identity)

    def _step(self, x, out, inverse, logdet):
        params = out.view(x.shape[0], 2, self.features)
        return ops.affine_coupling(x, params[:, 0], params[:, 1], scale=self.scale, clamp=self.clamp,
                                   inverse=inverse, logdet=logdet)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale!r}"


class MaskedAutoregressiveSpline(_Autoregressive):
    """Autoregressive Neural Spline Flow layer: y_i = spline(x_i; MADE(x_<i, context)_i), a
    rational-quadratic spline with `bins` bins on [-bound, bound] (identity outside, nflows'
    linear tails), the fused rq_spline op over the whole row; inverse_autoregressive=True
    conditions on the output. Other arguments as MaskedAutoregressiveAffine's.
    Starts as the identity (uniform bins, slope 1)."""

    LAYOUT = "feature-major"

    def __init__(self, features: int, hidden: int = 50, *, bins: int = 10, bound: float = 3.0, layers: int = 2,
                 context: int = 0, order: Union[str, torch.Tensor] = "natural", inverse_autoregressive: bool = False,
                 residual: bool = False, activation: Activation = "relu", dropout: float = 0.0):
        bins, bound = check_bins(bins), check_bound(bound)
        super().__init__(features, params_per_element(bins), hidden=hidden, layers=layers, context=context,
                         order=order, inverse_autoregressive=inverse_autoregressive, residual=residual,
                         activation=activation, dropout=dropout)
        self.bins, self.bound = bins, bound
        identity = torch.zeros(self.features, params_per_element(bins))
        identity[:, 2 * bins:] = identity_derivative_raw(MIN_DERIVATIVE)
        self._set_identity(identity)

    def _step(self, x, out, inverse, logdet):
        params = out.view(x.shape[0], self.features, self.made.params)
        return rq_spline(x, params, bins=self.bins, bound=self.bound, inverse=inverse, logdet=logdet)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, bound={self.bound}"
