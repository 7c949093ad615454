"""Coupling layers: a mask splits the features into a kept part, passed through unchanged,
and a transformed part, whose per-element transform is predicted from the kept part (and an
optional context) by a conditioner network: flowkern's MLP (ConvNet for images) or
ResidualNet, or any module of your own (flowkern.nn.nets says what it must be)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import ops
from ..reference.affine_coupling import SCALES, identity_scale_raw
from ..ops import _checks
from ..ops._autograd import eager_autograd
from .flow import FlowLayer, check_layer_context
from .nets import (MLP, TRIAL_SPATIAL, ConvNet, build_conditioner, draws_noise, on_meta,  # noqa: F401 (MLP, ConvNet:
                   output_layer, quietly, trial_inputs)  # re-exported)


class _SplitColumns(torch.autograd.Function):
    """(x[:, :k], x[:, k:]) as views, whose backward is one cat of the two gradients.

    Plain slicing costs more going back: each slice's backward fills a zero tensor of x's size
    and copies its gradient into it, and autograd adds the two; at MNIST sizes that was as
    much time as a coupling's own kernels."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.set_materialize_grads(False)
        ctx.k, ctx.total = k, x.shape[1]
        return x[:, :k], x[:, k:]

    @staticmethod
    def backward(ctx, g_first, g_second):
        if g_first is None and g_second is None:
            return None, None
        like = g_first if g_first is not None else g_second
        if g_first is None:
            g_first = like.new_zeros((like.shape[0], ctx.k, *like.shape[2:]))
        if g_second is None:
            g_second = like.new_zeros((like.shape[0], ctx.total - ctx.k, *like.shape[2:]))
        return torch.cat([g_first, g_second], dim=1), None


def split_columns(x: torch.Tensor, k: int):
    """(x[:, :k], x[:, k:]), through _SplitColumns where autograd will run its backward."""
    if eager_autograd(x):
        return _SplitColumns.apply(x, k)
    return x[:, :k], x[:, k:]


def coupling_mask(features: int, mask: Union[str, torch.Tensor] = "alternate", flip: bool = False) -> torch.Tensor:
    """Boolean mask of shape (features,): True marks a transformed feature, False a kept one.

    "alternate" transforms the odd indices, "half" the second half; flip=True swaps the two
    sets (stack layers with flip alternating so every feature gets transformed).
    """
    if isinstance(mask, str):
        idx = torch.arange(features)
        if mask == "alternate":
            m = idx % 2 == 1
        elif mask == "half":
            m = idx >= features // 2
        else:
            raise ValueError(f"mask must be 'alternate', 'half' or a bool tensor, got {mask!r}")
    elif isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool or mask.shape != (features,):
            raise ValueError(f"mask tensor must be bool of shape ({features},), got {mask.dtype} {tuple(mask.shape)}")
        m = mask.clone()
    else:
        raise TypeError(f"mask must be a string or a bool tensor, got {type(mask).__name__}")
    if flip:
        m = ~m
    if m.all() or not m.any():
        raise ValueError(f"mask must keep at least one feature and transform at least one (features={features})")
    return m


def _mask_layout(mask: torch.Tensor):
    """How a mask's two parts sit in dim 1, for splitting and merging without gathers:
    ("interleaved", kept_first) for alternating features (an even count), ("blocks",
    kept_first) for two contiguous runs, ("general", True) otherwise (index_select).

    Views and copies into strided halves cost less than index_select, whose backward (a zero
    fill and a scatter-add per part) cost as much as the coupling's own kernels at MNIST sizes;
    two contiguous halves (RealNVP's layout) cost least: the split is free.
    """
    m = mask.tolist()
    n = len(m)
    if n % 2 == 0 and all(m[i] != m[i + 1] for i in range(n - 1)):
        return "interleaved", not m[0]
    changes = sum(m[i] != m[i + 1] for i in range(n - 1))
    if changes == 1:
        return "blocks", not m[0]
    return "general", True


class _Coupling(FlowLayer):
    """What every coupling shares: the mask over dim 1 (features of (B, F), or channels of
    (B, C, H, W) for the conv couplings), the conditioner on the kept part and the context,
    and the merge back into the original order."""

    IMAGES = False  # (B, C, H, W) input and a ConvNet conditioner, instead of (B, F) and an MLP

    def __init__(self, features: int, hidden: int, params_per_feature: int,
                 mask: Union[str, torch.Tensor], flip: bool, context: int, conditioner="mlp"):
        super().__init__()
        what = "channels" if self.IMAGES else "features"
        if not isinstance(features, int) or features < 2:
            raise ValueError(f"{what} must be an int >= 2 (one kept, one transformed), got {features!r}")
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        if not isinstance(context, int) or context < 0:
            raise ValueError(f"context must be a non-negative int, got {context!r}")
        m = coupling_mask(features, mask, flip)
        self.features, self.context_features = features, context
        kept = torch.nonzero(~m).flatten()
        moved = torch.nonzero(m).flatten()
        self.register_buffer("mask", m, persistent=False)
        self.register_buffer("kept_idx", kept, persistent=False)
        self.register_buffer("moved_idx", moved, persistent=False)
        # cat([kept, moved])[:, merge_idx] restores the original feature order.
        self.register_buffer("merge_idx", torch.argsort(torch.cat([kept, moved])), persistent=False)
        self._layout = _mask_layout(m)
        self.params_per_feature = params_per_feature
        self.conditioner = build_conditioner(conditioner, len(kept), params_per_feature * len(moved),
                                             context=context, hidden=hidden, images=self.IMAGES)
        self.starts_as_identity = False

    def _init_identity(self, output: torch.Tensor, enabled: bool = True) -> None:
        """Makes the conditioner's output the constant `output` (the layer's identity values, shape
        (out_features,)) at init: zero weight and bias = output on its output layer
        (nets.output_layer). Checked on random inputs in the network's own mode (train: a dropout
        after the output layer shows), quietly (nets.quietly: buffers, modes and the random
        streams as they were); where the output is not that constant (an activation after the
        layer, say) the weights are put back and starts_as_identity stays False.
        enabled=False (identity_init=False) keeps the network's own init."""
        net = self.conditioner
        layer = output_layer(net, output.numel()) if enabled and not on_meta(net) else None
        if layer is None or (layer.bias is None and bool(torch.any(output != 0))):
            return
        saved = [(t, t.detach().clone()) for t in (layer.weight, layer.bias) if t is not None]
        with torch.no_grad():
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.copy_(output.to(layer.bias.dtype).reshape(layer.bias.shape))
        ok = False
        for spatial in TRIAL_SPATIAL if self.IMAGES else ((),):
            args = trial_inputs(net, 3, len(self.kept_idx), self.context_features, spatial, seed=0)
            try:
                with quietly(net, eval_mode=False):
                    got = net(*args)
            except Exception:  # noqa: BLE001 - too small an image for this network: try the next size
                continue
            want = output.to(got.dtype).view(1, -1, *([1] * len(spatial))).expand(3, -1, *spatial)
            ok = got.shape == want.shape and torch.equal(got, want)
            break
        if ok:
            self.starts_as_identity = True
        else:
            with torch.no_grad():
                for t, value in saved:
                    t.copy_(value)

    @property
    def stochastic(self) -> bool:
        """Whether a call draws random numbers (a dropout in the conditioner, in training):
        memory-saving backprop then keeps the input and replays the random stream."""
        return draws_noise(self.conditioner)

    def _split(self, x: torch.Tensor, context: Optional[torch.Tensor]):
        """(kept, moved, params): params is the conditioner's output viewed as
        (B, params_per_feature, transformed, *spatial)."""
        kept, moved, out = self._split_raw(x, context)
        return kept, moved, out.view(x.shape[0], self.params_per_feature, len(self.moved_idx), *x.shape[2:])

    def _split_raw(self, x: torch.Tensor, context: Optional[torch.Tensor]):
        """(kept, moved, the conditioner's output as it comes)."""
        self.check_input(x)
        kept, moved = self._take(x)
        return kept, moved, self._condition(kept, context, x.dtype)

    def _condition(self, kept: torch.Tensor, context: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The conditioner's output on the kept part (and the context), in `dtype`: net(kept) or,
        for a conditional layer, net(kept, context)."""
        if self.context_features:
            check_layer_context(context, self.context_features, kept.shape[0])
            out = self.conditioner(kept, context.to(kept.dtype))
        else:
            out = self.conditioner(kept)
        width = self.params_per_feature * len(self.moved_idx)
        if not isinstance(out, torch.Tensor) or out.shape != (kept.shape[0], width, *kept.shape[2:]):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"conditioner: its output must have shape {(kept.shape[0], width, *kept.shape[2:])}, "
                             f"got {got}")
        # Under autocast the conditioner computes in half precision; the transform runs in the
        # input's dtype (a no-op cast otherwise).
        return out.to(dtype)

    def fused_backward_from_output(self, y: torch.Tensor, grad_y: Optional[torch.Tensor],
                                   grad_logdet: Optional[torch.Tensor], context: Optional[torch.Tensor],
                                   wrt: Sequence[torch.Tensor], need_x: bool):
        """Memory-saving backprop's step for this layer from its output y alone, or None where the
        layer has no fused form (only AffineCoupling with a two-block mask has).

        Runs the conditioner once on y's kept part (the same as x's), then one kernel pass
        (affine_coupling_merge_backward_from_output) rebuilds x and the gradients of the
        transform; the conditioner's backward carries the params' gradient to `wrt` (the
        parameters, the context) and to the kept part. Returns (x, grad_x or None, grads of wrt).
        """
        return None

    def _take(self, x: torch.Tensor):
        """(kept, moved) parts of x along dim 1, as views where the mask's layout allows."""
        kind, kept_first = self._layout
        if kind == "interleaved":  # every other feature: selects of a (B, F/2, 2, ...) view
            pairs = x.reshape(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:])
            first, second = pairs.select(2, 0), pairs.select(2, 1)
            return (first, second) if kept_first else (second, first)
        if kind == "blocks":  # one contiguous run each
            k = len(self.kept_idx)
            if kept_first:
                return split_columns(x, k)
            moved, kept = split_columns(x, x.shape[1] - k)
            return kept, moved
        return x.index_select(1, self.kept_idx), x.index_select(1, self.moved_idx)

    def _merge(self, kept: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        kind, kept_first = self._layout
        parts = [kept, moved] if kept_first else [moved, kept]
        if kind == "interleaved":
            # Copies into the strided halves of one buffer: on the CPU torch.stack along a
            # trailing dim (and unbind's backward, a stack) takes ~3x as long.
            first = parts[0]
            merged = first.new_empty(first.shape[0], first.shape[1], 2, *first.shape[2:])
            merged.select(2, 0).copy_(parts[0])
            merged.select(2, 1).copy_(parts[1])
            return merged.view(merged.shape[0], merged.shape[1] * 2, *merged.shape[3:])
        if kind == "blocks":
            return torch.cat(parts, dim=1)
        return torch.cat([kept, moved], dim=1).index_select(1, self.merge_idx)

    def check_input(self, x: torch.Tensor) -> None:
        _checks.tensor("x", x, min_dim=2)
        # (Memory-saving backprop's stand-ins for the conditioner hold no parameters: no check.)
        weight = next(self.conditioner.parameters(), None)
        if weight is not None and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x must have the dtype of the layer's parameters ({weight.dtype}), got {x.dtype}: "
                            "cast the flow (e.g. flow.double()) or the data, or run under torch.autocast")
        if self.IMAGES:
            if x.dim() != 4 or x.shape[1] != self.features:
                raise ValueError(f"x must have shape (batch, {self.features}, height, width), got {tuple(x.shape)}")
        elif x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"x must have shape (batch, {self.features}), got {tuple(x.shape)}")

    def _transform(self, x, context, logdet, inverse):
        raise NotImplementedError

    def forward(self, x, context=None, logdet=None):
        return self._transform(x, context, logdet, inverse=False)

    def inverse(self, z, context=None, logdet=None):
        return self._transform(z, context, logdet, inverse=True)

    def extra_repr(self) -> str:
        what = "channels" if self.IMAGES else "features"
        return f"{what}={self.features}, transformed={len(self.moved_idx)}, context={self.context_features}"


class AffineCoupling(_Coupling):
    """RealNVP affine coupling: y_moved = x_moved * m(x_kept) + t(x_kept), fused log-det.

    Args:
        features: width of the (B, features) input.
        hidden: width of the conditioner's two hidden layers.
        mask: "alternate", "half", or a bool tensor (True = transformed).
        flip: swap kept and transformed features (alternate it between stacked layers).
        scale: "tanh" (default: exp of a soft-clamped log-scale, zuko's and FrEIA's), "sigmoid"
            (nflows' and Glow's, m <= 1.001) or "exp"; docs/defaults.md has the measurements
            behind the default.
        clamp: the soft clamp of scale="tanh".
        context: width of a conditioning vector (0 for an unconditional layer).
        conditioner: "mlp" (default; ConvNet for the conv form) or "residual" (ResidualNet), both
            `hidden` wide, or your own network: an nn.Module, or a factory
            f(in_features, out_features) -> nn.Module (nflows' convention). It is called as
            net(kept) or, with context, net(kept, context), and returns (B, 2 * transformed):
            the shifts, then the raw scales (see flowkern.nn.nets).
        identity_init: start as the identity by zeroing the conditioner's output layer and setting
            its bias (starts_as_identity says whether that worked); False keeps your init.
    """

    def __init__(self, features: int, hidden: int = 512, mask: Union[str, torch.Tensor] = "alternate",
                 scale: str = "tanh", context: int = 0, *, flip: bool = False, clamp: float = 2.0,
                 conditioner="mlp", identity_init: bool = True):
        _checks.choice("scale", scale, SCALES)
        super().__init__(features, hidden, 2, mask, flip, context, conditioner)
        self.scale, self.clamp = scale, _checks.positive("clamp", clamp)
        # Conditioner outputs are [shift | raw scale]; with zero weights, start the raw scale
        # where m = 1, so a new layer is exactly the identity for every scale function.
        identity = torch.zeros(2, len(self.moved_idx))
        identity[1] = identity_scale_raw(scale)
        self._init_identity(identity.flatten(), _checks.flag("identity_init", identity_init))

    def _transform(self, x, context, logdet, inverse):
        kind, kept_first = self._layout
        if kind == "blocks":
            # The fused layer op: the conditioner's output as it comes, the merge in the kernel.
            kept, moved, params = self._split_raw(x, context)
            return ops.affine_coupling_merge(kept, moved, params, kept_first=kept_first,
                                             scale=self.scale, clamp=self.clamp, inverse=inverse, logdet=logdet)
        kept, moved, params = self._split(x, context)
        shift, scale_raw = params.unbind(1)
        moved, logdet = ops.affine_coupling(moved, shift, scale_raw, scale=self.scale, clamp=self.clamp,
                                            inverse=inverse, logdet=logdet)
        return self._merge(kept, moved), logdet

    def fused_backward_from_output(self, y, grad_y, grad_logdet, context, wrt, need_x):
        kind, kept_first = self._layout
        if kind != "blocks":
            return None
        from ..ops.affine_coupling import affine_coupling_merge_backward_from_output

        self.check_input(y)
        kept = self._take(y.detach())[0].requires_grad_(need_x)
        with torch.enable_grad():
            params = self._condition(kept, context, y.dtype)
        x, grad_x, grad_params = affine_coupling_merge_backward_from_output(
            grad_y, grad_logdet, y, params.detach(), kept=len(self.kept_idx), kept_first=kept_first,
            scale=self.scale, clamp=self.clamp)
        inputs = ([kept] if need_x else []) + list(wrt)
        got = torch.autograd.grad(params, inputs, grad_params, allow_unused=True) if inputs else ()
        if need_x:
            if got[0] is not None:  # the conditioner's share of the kept part's gradient
                self._take(grad_x)[0].add_(got[0])
            got = got[1:]
        return x, (grad_x if need_x else None), list(got)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale!r}"


class ConvAffineCoupling(AffineCoupling):
    """Glow's affine coupling for images (B, C, H, W): the mask splits the channels (default
    "half"), a ConvNet conditioner predicts a shift and a scale for every transformed pixel.
    Arguments as AffineCoupling's, with channels for features; context (B, C_ctx) is broadcast
    over the image as extra input channels of the conditioner."""

    IMAGES = True

    def __init__(self, channels: int, hidden: int = 512, mask: Union[str, torch.Tensor] = "half",
                 scale: str = "tanh", context: int = 0, *, flip: bool = False, clamp: float = 2.0,
                 conditioner="mlp", identity_init: bool = True):
        super().__init__(channels, hidden, mask, scale, context, flip=flip, clamp=clamp, conditioner=conditioner,
                         identity_init=identity_init)


class AdditiveCoupling(_Coupling):
    """NICE additive coupling: y_moved = x_moved + t(x_kept), log-det 0 (volume preserving).
    Arguments as AffineCoupling's (no scale); the conditioner returns (B, transformed), the shifts."""

    def __init__(self, features: int, hidden: int = 512, mask: Union[str, torch.Tensor] = "alternate",
                 context: int = 0, *, flip: bool = False, conditioner="mlp", identity_init: bool = True):
        super().__init__(features, hidden, 1, mask, flip, context, conditioner)
        self._init_identity(torch.zeros(len(self.moved_idx)), _checks.flag("identity_init", identity_init))

    def _transform(self, x, context, logdet, inverse):
        kept, moved, params = self._split(x, context)
        moved, logdet = ops.additive_coupling(moved, params[:, 0], inverse=inverse, logdet=logdet)
        return self._merge(kept, moved), logdet
