"""Pure-PyTorch definitions of every flowkern op: the ground truth the kernels are tested against."""
from .actnorm import actnorm_ref
from .additive_coupling import additive_coupling_ref
from .affine_coupling import affine_coupling_ref
from .batchnorm_flow import batch_stats_ref, batchnorm_flow_ref
from .dequantize import (counter_uniform, dequantize_logit_inverse_ref, dequantize_logit_ref, dequantize_ref, logit_ref,
                         quantize_ref)
from .gaussian_nll import gaussian_nll_ref
from .rq_spline import rq_spline_ref

__all__ = ["actnorm_ref", "additive_coupling_ref", "batch_stats_ref", "batchnorm_flow_ref", "affine_coupling_ref", "counter_uniform",
           "dequantize_logit_inverse_ref", "dequantize_logit_ref", "dequantize_ref", "gaussian_nll_ref", "logit_ref",
           "quantize_ref", "rq_spline_ref"]
