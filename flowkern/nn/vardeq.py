"""Variational dequantization (Ho et al. 2019, Flow++): learn the dequantization noise.

Uniform dequantization trains a flow on x + u with u ~ U[0, 1)^D and reports the Theis et al.
bound E_u[log p(x + u)] <= log P(x). With noise drawn from a learned q(u | x) instead,

    log P(x) >= E_{u ~ q(.|x)}[log p(x + u) - log q(u | x)],

a bound that is tight when q(u | x) matches the model's density inside the pixel's unit cube.
q is itself a small conditional flow: Gaussian noise e ~ N(0, I) through affine couplings whose
conditioners see the image, then a sigmoid into (0, 1):

    a = g(e; x),   u = sigmoid(a),
    log q(u | x) = log N(e; 0, I) - log|det dg/de| - sum(log sigmoid(a) + log sigmoid(-a)).

VariationalDequantize is a DequantizeLogit whose noise comes from q: forward(x) returns the logits
of (x + u) / 256 and the running log-det minus log q(u | x), so Flow.log_prob(x) is one sample of
the variational bound's integrand and Flow.bits_per_dim reports the bound in bits/dim with no
other change; gradients reach q's parameters through u (dequantize_logit differentiates its
given noise). inverse() quantizes, as DequantizeLogit's does. Estimating log P(x) itself with K
noise draws is importance_log_prob.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.dequantize import dequantize_logit
from ..ops.gaussian_nll import gaussian_nll
from .coupling import AffineCoupling
from .preprocess import DequantizeLogit

class VariationalDequantize(DequantizeLogit):
    """Flow++'s learned dequantization in front of the fused dequantize + logit.

    Args:
        image_shape: the shape of one image, e.g. (1, 28, 28) or 784.
        layers: affine couplings in q's flow (alternating halves of the pixels).
        hidden: width of their MLP conditioners, which see the kept noise and the whole image
            (scaled to [-1, 1]) as context.
        alpha: the logit's squeeze, as DequantizeLogit's.
        dtype: the output dtype, as DequantizeLogit's.
    """

    def __init__(self, image_shape: Union[int, Sequence[int]], layers: int = 4, hidden: int = 64,
                 alpha: float = 1e-6, dtype: Optional[torch.dtype] = None):
        super().__init__(alpha, dtype)
        shape = (image_shape,) if isinstance(image_shape, int) else tuple(image_shape)
        if not shape or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"image_shape must be positive ints, got {image_shape!r}")
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be a positive int, got {layers!r}")
        self.image_shape = shape
        self.features = math.prod(shape)
        if self.features < 2:
            raise ValueError(f"an image needs at least 2 values for q's couplings, got shape {shape}")
        # Exp scales (no 1e-3 floor) with a soft clamp: q can narrow the noise where the model's
        # density is sharp.
        self.couplings = nn.ModuleList(
            AffineCoupling(self.features, hidden, mask="half", scale="tanh", clamp=3.0, context=self.features,
                           flip=i % 2 == 1) for i in range(layers))

    def _check_pixels(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must have shape (batch, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")

    def sample_noise(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """u ~ q(. | x) of x's shape in [0, 1) and log q(u | x) per row (B,), differentiable in
        q's parameters. eps: the Gaussian noise (B, D) to push through q (default: fresh
        torch.randn from the global RNG)."""
        self._check_pixels(x)
        rows, dtype = x.shape[0], self.dtype
        context = x.reshape(rows, self.features).to(dtype) * (2.0 / 255.0) - 1.0
        if eps is None:
            eps = torch.randn(rows, self.features, device=x.device, dtype=dtype)
        elif eps.shape != (rows, self.features):
            raise ValueError(f"eps must have shape ({rows}, {self.features}), got {tuple(eps.shape)}")
        log_q = -gaussian_nll(eps)  # log N(eps; 0, I)
        a, logdet = eps, None
        for layer in self.couplings:
            a, logdet = layer(a, context, logdet)
        # log|du/da| = log sigmoid(a) + log sigmoid(-a), elementwise.
        log_q = log_q - logdet - (F.logsigmoid(a) + F.logsigmoid(-a)).sum(1).to(log_q.dtype)
        # sigmoid(a) rounds to 1.0 (float32: a > ~16.6): kept at the largest value below 1,
        # 1 - eps / 2, inside [0, 1).
        u = torch.sigmoid(a).clamp(max=1 - torch.finfo(a.dtype).eps / 2)
        return u.view(x.shape), log_q

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        u, log_q = self.sample_noise(x)
        y, logdet = dequantize_logit(x, u, alpha=self.alpha, dtype=self.dtype, logdet=logdet)
        return y, logdet - log_q.to(logdet.dtype)

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, {super().extra_repr()}"


@torch.no_grad()
def importance_log_prob(flow: nn.Module, x: torch.Tensor, samples: int, context: Optional[torch.Tensor] = None
                        ) -> torch.Tensor:
    """log P(x) of 8-bit images estimated with `samples` dequantization draws, per row (B,):

        log (1/K) sum_k exp(log p(x + u_k) - log q(u_k | x)),   u_k ~ q(. | x)

    for a flow that starts with a dequantization layer (uniform: log q = 0; variational: q's own
    density), i.e. the log-mean-exp of K calls of flow.log_prob(x). K = 1 is the usual bound;
    the estimate's expectation rises towards log P(x) as K grows (Burda et al. 2016).

    An evaluation: the flow runs in eval mode (restored after), so the K calls neither update a
    BatchNormFlow's running statistics nor initialise an ActNorm."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    was_training = flow.training
    flow.eval()
    try:
        draws = torch.stack([flow.log_prob(x, context) for _ in range(samples)])  # (K, B)
    finally:
        flow.train(was_training)
    return torch.logsumexp(draws.double(), dim=0) - math.log(samples)
