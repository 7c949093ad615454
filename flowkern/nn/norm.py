"""Normalisation layers for flows: ActNorm (Glow) and BatchNormFlow (RealNVP).

Both act per feature on (B, C) input and per channel on (B, C, *spatial) input (any number of
spatial dims), are invertible with a log-det that is the same for every row of a batch, and
ignore `context`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..ops import _checks
from ..ops.actnorm import actnorm
from ..ops.batchnorm_flow import batch_stats, batchnorm_flow, batchnorm_flow_train
from .flow import FlowLayer


def _channel_count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"features_or_channels must be a positive int, got {value!r}")
    return value


def _values_per_channel(x: torch.Tensor) -> int:
    return x.shape[0] * math.prod(x.shape[2:])


class _ChannelLayer(FlowLayer):
    """Input checks shared by the per-channel layers."""

    features: int

    def check_input(self, x, name: str = "x", logdet: Optional[torch.Tensor] = None) -> None:
        _checks.tensor(name, x, min_dim=2)
        if x.shape[1] != self.features:
            raise ValueError(f"{name} must have shape (batch, {self.features}) or (batch, {self.features}, *spatial), "
                             f"got {tuple(x.shape)}")
        # Checked here, not only in the op: a wrong input must fail before it touches the state
        # (ActNorm's initialisation, BatchNormFlow's running statistics).
        param = next(self.parameters())
        if x.dtype != param.dtype:
            raise TypeError(f"{name} must have the dtype of the layer's parameters ({param.dtype}), got {x.dtype}: "
                            "convert one of them (layer.to(dtype))")
        if x.device != param.device:
            raise ValueError(f"{name} is on {x.device} but the layer is on {param.device}")
        _checks.running_logdet(logdet, x)


class ActNorm(_ChannelLayer):
    """Glow's activation normalisation: y = (x + shift) * exp(log_scale) per feature/channel.

    log-det per row = spatial_size * sum(log_scale), spatial_size = prod(x.shape[2:]).

    Data-dependent initialisation: the first forward in training mode of a layer whose
    `initialized` buffer is False sets, from that batch (over batch and spatial dims),
    shift = -mean and log_scale = -log(std + eps) (biased std), so that the batch comes out
    with zero mean and unit variance per channel; eps keeps a constant channel finite
    (log_scale = -log(eps)). `initialized` is a persistent buffer: a loaded state dict is not
    re-initialised. initialize(x) runs the initialisation explicitly (e.g. on a larger batch);
    reset_initialization() makes the next training forward initialise again.

    Before initialisation a forward in eval mode applies the current parameters (the identity
    for a new layer) and inverse raises: sampling from a layer that never saw data is almost
    always a forgotten training step or state dict. For torch.compile(fullgraph=True), run one
    eager training batch first (or load a state dict): the initialisation check then reads a
    cached Python flag, not the buffer.

    Args:
        features_or_channels: C, the size of dim 1 of the input.
        eps: added to the std in the initialisation.
    """

    def __init__(self, features_or_channels: int, eps: float = 1e-6):
        super().__init__()
        self.features = _channel_count(features_or_channels)
        self.eps = _checks.positive("eps", eps)
        self.shift = nn.Parameter(torch.zeros(self.features))
        self.log_scale = nn.Parameter(torch.zeros(self.features))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized_seen = False  # a cache of the buffer once True (no tensor read per call)

    def reset_initialization(self) -> None:
        """Marks the layer uninitialised: the next training forward initialises it from its
        batch again. (Write the flag through this, not into the `initialized` buffer: the layer
        caches the flag once True, so that a forward reads no tensor.)"""
        self.initialized.fill_(False)
        self._initialized_seen = False

    def _is_initialized(self) -> bool:
        if not self._initialized_seen:
            self._initialized_seen = bool(self.initialized)
        return self._initialized_seen

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # Read the loaded flag now, not on the next call: a read there is a graph break under
        # torch.compile (Tensor.item), which would leave a compiled flow's layer loop eager.
        flag = self.initialized
        self._initialized_seen = flag.device.type != "meta" and bool(flag)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation from the batch x; marks the layer initialised."""
        self.check_input(x)
        if _values_per_channel(x) < 2:
            raise ValueError("ActNorm's data-dependent initialisation needs at least 2 values per channel "
                             f"(batch * spatial size), got x of shape {tuple(x.shape)}: initialise on a larger batch")
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean, var = batch_stats(x.detach().to(acc))  # under no_grad: the deterministic kernel
        self.shift.copy_(-mean)
        self.log_scale.copy_(-torch.log(var.sqrt() + self.eps))
        self.initialized.fill_(True)
        self._initialized_seen = True

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x, logdet=logdet)
        if self.training and not self._is_initialized():
            self.initialize(x)
        return actnorm(x, self.shift, self.log_scale, logdet=logdet)

    def inverse(self, z: torch.Tensor, context: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        self.check_input(z, "z", logdet)
        if not self._is_initialized():
            raise RuntimeError("ActNorm.inverse called before the layer was initialised: run a forward pass in "
                               "training mode on data (or call initialize(x)), or load a trained state dict")
        return actnorm(z, self.shift, self.log_scale, inverse=True, logdet=logdet)

    def extra_repr(self) -> str:
        return f"{self.features}, eps={self.eps:g}"


class BatchNormFlow(_ChannelLayer):
    """Batch normalisation as a flow layer (RealNVP):

        y = (x - mean) / sqrt(var + eps) * exp(log_gamma) + beta,
        log-det per row = spatial_size * sum(log_gamma - 0.5 * log(var + eps)).

    Which statistics (mean, var):
      - forward, training mode: the batch's, over batch and spatial dims (biased variance), and
        the log-det uses that batch variance. Gradients flow through the batch statistics, as in
        torch.nn.BatchNorm (flowkern.ops.batchnorm_flow_train: statistics and map fused, one
        autograd node). The running averages are updated by torch.nn.BatchNorm1d's rule,
        running = (1 - momentum) * running + momentum * batch_stat, with the UNBIASED batch
        variance (the normalisation itself uses the biased one). Training mode needs at least 2
        values per channel (batch * spatial size >= 2): the variance of one value is 0, and the
        unbiased estimate divides by 0. Smaller batches raise ValueError; use eval mode.
      - forward, eval mode: the running averages; then inverse is its exact inverse.
      - inverse, in either mode: the running averages. The batch statistics of a latent batch
        are not those of the data batch that produced it, so there is nothing better to invert
        with; in training mode inverse(forward(x)) is therefore only approximately x.

    The training-mode forward is not exactly invertible per sample: each output row depends
    on the whole batch through its statistics. Its log-det is that of the per-row map with the
    batch statistics held fixed (the usual RealNVP convention), not of the batch-to-batch map.

    Args:
        features_or_channels: C, the size of dim 1 of the input.
        momentum: weight of the new batch in the running averages, in [0, 1].
        eps: added to the variance.
    """

    def __init__(self, features_or_channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.features = _channel_count(features_or_channels)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.eps = _checks.positive("eps", eps)
        self.log_gamma = nn.Parameter(torch.zeros(self.features))
        self.beta = nn.Parameter(torch.zeros(self.features))
        self.register_buffer("running_mean", torch.zeros(self.features))
        self.register_buffer("running_var", torch.ones(self.features))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x, logdet=logdet)
        if not self.training:
            return batchnorm_flow(x, self.running_mean, self.running_var, self.log_gamma, self.beta, eps=self.eps,
                                  logdet=logdet)
        n = _values_per_channel(x)
        if n < 2:
            raise ValueError("BatchNormFlow in training mode needs at least 2 values per channel (batch * spatial "
                             f"size) to estimate a variance, got x of shape {tuple(x.shape)}: use a larger batch, "
                             "or eval mode (running statistics)")
        # One fused op: the batch statistics, the map, and one autograd node through both.
        y, ld, mean, var = batchnorm_flow_train(x, self.log_gamma, self.beta, eps=self.eps, logdet=logdet)
        self._update_running_stats(mean, var, n)
        return y, ld

    def inverse(self, z: torch.Tensor, context: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        self.check_input(z, "z", logdet)
        return batchnorm_flow(z, self.running_mean, self.running_var, self.log_gamma, self.beta,
                              eps=self.eps, inverse=True, logdet=logdet)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        m = self.momentum
        unbiased = var.detach().to(self.running_var.dtype) * (n / (n - 1))
        self.running_mean.mul_(1.0 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1.0 - m).add_(unbiased, alpha=m)

    def extra_repr(self) -> str:
        return f"{self.features}, momentum={self.momentum:g}, eps={self.eps:g}"
