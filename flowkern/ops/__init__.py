"""flowkern's functional ops: flow transforms returning (output, logdet)."""
from .additive_coupling import additive_coupling
from .affine_coupling import affine_coupling
from .dequantize import dequantize, dequantize_logit, logit, quantize

__all__ = ["additive_coupling", "affine_coupling", "dequantize", "dequantize_logit", "logit", "quantize"]
