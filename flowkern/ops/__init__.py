"""flowkern's functional ops: fused flow transforms returning (output, logdet)."""
from .affine_coupling import affine_coupling

__all__ = ["affine_coupling"]
