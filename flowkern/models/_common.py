"""Pieces the ready-made models share."""
from __future__ import annotations

from typing import Optional

from torch import nn

NORMS = (None, "actnorm", "batchnorm")


def norm_layer(norm: Optional[str], channels: int) -> nn.Module:
    from ..nn.norm import ActNorm, BatchNormFlow

    return ActNorm(channels) if norm == "actnorm" else BatchNormFlow(channels)


DEQUANTIZE = (False, True, "none", "uniform", "variational")


def preprocess_layers(dequantize, alpha: float, image_shape=None) -> list:
    """The layers in front of a model that takes 8-bit pixels:

    - False / "none": nothing (the model takes real-valued data);
    - True / "uniform": [DequantizeLogit(alpha)], uniform noise, dequantize and logit fused;
    - "variational": [VariationalDequantize(image_shape, alpha=alpha)], noise from a learned
      conditional flow q(u | x) (Flow++), whose log q the log-det subtracts.
    """
    if dequantize not in DEQUANTIZE:  # bools and strings only (1 == True would pass `in`)
        raise ValueError(f"dequantize must be one of {DEQUANTIZE}, got {dequantize!r}")
    if isinstance(dequantize, int) and not isinstance(dequantize, bool):
        raise ValueError(f"dequantize must be one of {DEQUANTIZE}, got {dequantize!r}")
    if dequantize in (False, "none"):
        return []
    from ..nn.preprocess import DequantizeLogit

    if dequantize == "variational":
        from ..nn.vardeq import VariationalDequantize

        return [VariationalDequantize(image_shape, alpha=alpha)]
    return [DequantizeLogit(alpha)]
