"""Pieces the ready-made models share."""
from __future__ import annotations

from typing import Optional

from torch import nn

NORMS = (None, "actnorm", "batchnorm")


def norm_layer(norm: Optional[str], channels: int) -> nn.Module:
    from ..nn.norm import ActNorm, BatchNormFlow

    return ActNorm(channels) if norm == "actnorm" else BatchNormFlow(channels)


def preprocess_layers(dequantize: bool, alpha: float) -> list:
    """[DequantizeLogit(alpha)] (Dequantize and Logit fused) when the model takes 8-bit pixels,
    else nothing."""
    if not dequantize:
        return []
    from ..nn.preprocess import DequantizeLogit

    return [DequantizeLogit(alpha)]
