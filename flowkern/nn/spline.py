"""Neural Spline Flow coupling: the transformed features go through a monotone rational-quadratic
spline on [-bound, bound] (identity outside) whose knots a conditioner network predicts from the kept features."""
from __future__ import annotations

from typing import Union

import torch

from ..ops.rq_spline import check_bins, check_bound, rq_spline
from ..reference.rq_spline import MIN_DERIVATIVE, identity_derivative_raw, params_per_element
from ..ops import _checks
from .coupling import _Coupling


class SplineCoupling(_Coupling):
    """Rational-quadratic spline coupling (Durkan et al. 2019, nflows' linear tails):
    y_moved = spline(x_moved; params(x_kept)), fused log-det.

    Args:
        features: width of the (B, features) input.
        hidden: width of the conditioner's two hidden layers.
        bins: number of spline bins; the conditioner predicts 3 * bins - 1 numbers per
            transformed feature (bins widths, bins heights, bins - 1 interior derivatives).
        bound: the spline acts on [-bound, bound]; outside, the layer is the identity.
        mask: "alternate", "half", or a bool tensor (True = transformed).
        context: width of a conditioning vector (0 for an unconditional layer).
        flip: swap kept and transformed features (alternate it between stacked layers).
        conditioner: "mlp" (default) or "residual" (ResidualNet, sbi's NSF), both `hidden` wide,
            or your own network (an nn.Module or a factory f(in_features, out_features)), called
            as net(kept) or net(kept, context), returning (B, transformed * (3 * bins - 1)), read
            as (B, transformed, 3 * bins - 1): each feature's widths, heights, derivatives.
        identity_init: start as the identity (see AffineCoupling); False keeps your init.
    """

    def __init__(self, features: int, hidden: int = 512, bins: int = 8, bound: float = 3.0,
                 mask: Union[str, torch.Tensor] = "alternate", context: int = 0, *, flip: bool = False,
                 conditioner="mlp", identity_init: bool = True):
        bins, bound = check_bins(bins), check_bound(bound)
        super().__init__(features, hidden, params_per_element(bins), mask, flip, context, conditioner)
        self.bins, self.bound = bins, bound
        # The conditioner's output is read feature-major, (B, transformed, P) as nflows reads it:
        # each feature's P numbers are adjacent, the layout the spline kernels take, so the
        # output needs no transposed copy going forward and its gradient none going back.
        # With zero weights the widths and heights are uniform (equal knots in x and y, slope 1);
        # start the derivatives at 1 too, so a new layer is the identity.
        identity = torch.zeros(len(self.moved_idx), self.params_per_feature)  # (transformed, P)
        identity[:, 2 * bins:] = identity_derivative_raw(MIN_DERIVATIVE)
        self._init_identity(identity.flatten(), _checks.flag("identity_init", identity_init))

    def _transform(self, x, context, logdet, inverse):
        kept, moved, out = self._split_raw(x, context)
        params = out.view(*moved.shape, self.params_per_feature)  # (B, transformed, P)
        moved, logdet = rq_spline(moved, params, bins=self.bins, bound=self.bound, inverse=inverse, logdet=logdet)
        return self._merge(kept, moved), logdet

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, bound={self.bound}"
