"""Pure-PyTorch definitions of every flowkern op: the ground truth the kernels are tested against."""
from .affine_coupling import affine_coupling_ref

__all__ = ["affine_coupling_ref"]
