"""flowkern's functional ops: fused flow transforms returning (output, logdet)."""
from .additive_coupling import additive_coupling
from .affine_coupling import affine_coupling

__all__ = ["additive_coupling", "affine_coupling"]
