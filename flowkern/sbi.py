"""flowkern for sbi (pip install flowkern[sbi]; sbi 0.27): neural posterior estimation on the
fused kernels, two ways.

    from sbi.inference import NPE
    import flowkern.sbi

    # sbi's own estimators (nflows' NSF / MAF / autoregressive NSF, zuko's), accelerated
    npe = NPE(prior, density_estimator=flowkern.sbi.posterior_nn("nsf", hidden_features=50))
    # flowkern's NSF / MAF behind sbi's ConditionalDensityEstimator
    npe = NPE(prior, density_estimator=flowkern.sbi.build("nsf", hidden=50, layers=5))
    npe.append_simulations(theta, x).train()

posterior_nn takes sbi's posterior_nn arguments unchanged and runs flowkern.accelerate on what
sbi builds (docs/interop.md: what is covered). build() makes flowkern.models.NSF / MAF, with
sbi's defaults (5 layers, hidden 50, 10 bins on [-3, 3], 2 blocks) and sbi's z-scoring of theta
and x from the first batch sbi shows it, behind the estimator protocol sbi's training loop and
posteriors call (log_prob, loss, sample, sample_and_log_prob).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from . import models
from .interop import accelerate

__all__ = ["FlowkernEstimator", "build", "posterior_nn"]

MODELS = ("nsf", "maf", "maf_rqs")


def _sbi():
    try:
        import sbi  # noqa: F401
        from sbi.neural_nets.estimators.base import ConditionalDensityEstimator
    except ImportError as e:  # pragma: no cover - exercised only without sbi
        raise ImportError("flowkern.sbi needs sbi (pip install 'flowkern[sbi]', sbi 0.27)") from e
    return ConditionalDensityEstimator


def posterior_nn(model: str = "nsf", **kwargs) -> Callable:
    """sbi.neural_nets.posterior_nn(model, **kwargs), with flowkern.accelerate applied to each
    estimator it builds: for NPE(prior, density_estimator=...)."""
    _sbi()
    from sbi.neural_nets import posterior_nn as sbi_posterior_nn

    sbi_build = sbi_posterior_nn(model=model, **kwargs)

    def build_accelerated(batch_theta: torch.Tensor, batch_x: torch.Tensor):
        return accelerate(sbi_build(batch_theta, batch_x))

    build_accelerated.__doc__ = f"sbi's {model!r} estimator, accelerated by flowkern"
    return build_accelerated


class Standardize(nn.Module):
    """(v - mean) / std per feature, from buffers (sbi's z-scoring)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, v):
        return (v - self.mean) / self.std


def _moments(batch: torch.Tensor, enabled: bool):
    flat = batch.reshape(batch.shape[0], -1).double()
    if not enabled or batch.shape[0] < 2:
        return torch.zeros(flat.shape[1:]), torch.ones(flat.shape[1:])
    return flat.mean(0).float(), flat.std(0).clamp_min(1e-14).float()  # sbi's minimum std


def build(model: str = "nsf", *, hidden: int = 50, layers: int = 5, bins: int = 10, bound: float = 3.0,
          blocks: int = 2, embedding_net: Optional[nn.Module] = None, z_score_theta: bool = True,
          z_score_x: bool = True, **model_kwargs) -> Callable:
    """A builder f(batch_theta, batch_x) -> FlowkernEstimator for NPE(prior, density_estimator=f):
    model "nsf" (coupling spline flow, sbi's nsf), "maf_rqs" (autoregressive spline flow) or
    "maf" (masked autoregressive affine flow); the remaining keywords go to flowkern.models.NSF
    or MAF. theta and x are z-scored with the first batch's mean and std (sbi's default)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    _sbi()

    def builder(batch_theta: torch.Tensor, batch_x: torch.Tensor) -> "FlowkernEstimator":
        if batch_theta.dim() != 2:
            raise ValueError(f"flowkern.sbi.build takes theta of shape (batch, D), got {tuple(batch_theta.shape)}")
        features = batch_theta.shape[1]
        t_mean, t_std = _moments(batch_theta, z_score_theta)
        x_mean, x_std = _moments(batch_x, z_score_x)
        embed = nn.Sequential(nn.Flatten(), Standardize(x_mean, x_std),
                              *([embedding_net] if embedding_net is not None else []))
        with torch.no_grad():
            context = embed(batch_x[:2].float()).shape[-1]
        if model == "maf":
            net = models.MAF(features, context, layers, hidden, blocks=blocks, embedding=embed, **model_kwargs)
        else:
            net = models.NSF(features, context, layers, hidden, bins=bins, bound=bound, blocks=blocks,
                             autoregressive=model == "maf_rqs", embedding=embed, **model_kwargs)
        return FlowkernEstimator(net, t_mean, t_std, batch_theta.shape[1:], batch_x.shape[1:])

    return builder


def _define():
    base = _sbi()

    class FlowkernEstimator(base):
        """A flowkern Flow behind sbi's ConditionalDensityEstimator: theta z-scored by fixed
        buffers (its log-det added), x z-scored in the flow's embedding."""

        def __init__(self, net, theta_mean, theta_std, input_shape, condition_shape):
            super().__init__(net, input_shape=torch.Size(input_shape), condition_shape=torch.Size(condition_shape))
            self.register_buffer("theta_mean", theta_mean)
            self.register_buffer("theta_std", theta_std)

        @property
        def embedding_net(self):
            return self.net.embedding

        def log_prob(self, input, condition, **kwargs):
            input, condition, batch_dim = self._broadcast_and_align(input, condition)
            sample_dim = input.shape[0]
            theta = input.reshape(sample_dim * batch_dim, -1)
            cond = condition.reshape(sample_dim * batch_dim, *self.condition_shape)
            z = (theta - self.theta_mean) / self.theta_std
            lp = self.net.log_prob(z, context=cond) - torch.log(self.theta_std).sum()
            return lp.reshape(sample_dim, batch_dim)

        def loss(self, input, condition, **kwargs):
            return -self.log_prob(input.unsqueeze(0), condition)[0]

        def sample(self, sample_shape, condition, **kwargs):
            self._check_condition_shape(condition)
            n = torch.Size(sample_shape).numel()
            batch = condition.shape[0]
            z = self.net.sample(n, context=condition)  # (n, batch, D): sbi's layout already
            theta = z * self.theta_std + self.theta_mean
            return theta.reshape(*sample_shape, batch, *self.input_shape)

    FlowkernEstimator.__module__ = __name__
    FlowkernEstimator.__qualname__ = "FlowkernEstimator"
    return FlowkernEstimator


try:
    FlowkernEstimator = _define()
except ImportError:  # sbi absent: build() and posterior_nn() raise a clear ImportError
    class FlowkernEstimator:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            _sbi()
