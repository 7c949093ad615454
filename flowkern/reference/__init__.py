"""Pure-PyTorch definitions of every flowkern op: the ground truth the kernels are tested against."""
from .actnorm import actnorm_ref
from .additive_coupling import additive_coupling_ref
from .affine_coupling import affine_coupling_ref
from .batchnorm_flow import batch_stats_ref, batchnorm_flow_ref
from .dequantize import dequantize_logit_ref, dequantize_ref, logit_ref, quantize_ref
from .rq_spline import rq_spline_ref

__all__ = ["actnorm_ref", "additive_coupling_ref", "batch_stats_ref", "batchnorm_flow_ref", "affine_coupling_ref", "dequantize_logit_ref", "dequantize_ref", "logit_ref",
           "quantize_ref", "rq_spline_ref"]
