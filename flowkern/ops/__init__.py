"""flowkern's functional ops: flow transforms returning (output, logdet)."""
from .actnorm import actnorm
from .additive_coupling import additive_coupling
from .affine_coupling import affine_coupling, affine_coupling_merge
from .batchnorm_flow import batch_stats, batchnorm_flow, batchnorm_flow_train
from .dequantize import dequantize, dequantize_logit, dequantize_logit_inverse, logit, quantize
from .gaussian_nll import gaussian_nll
from .rq_spline import rq_spline

__all__ = ["actnorm", "additive_coupling", "batch_stats", "batchnorm_flow", "batchnorm_flow_train", "affine_coupling",
           "affine_coupling_merge", "dequantize", "dequantize_logit",
           "dequantize_logit_inverse", "gaussian_nll", "logit", "quantize", "rq_spline"]
