"""Invertible layers built on flowkern's fused ops, and Flow, which composes them."""
from .coupling import MLP, AffineCoupling, coupling_mask
from .flow import Flow, FlowLayer, StandardNormal

__all__ = ["AffineCoupling", "Flow", "FlowLayer", "MLP", "StandardNormal", "coupling_mask"]
