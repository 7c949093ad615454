"""Triton kernels of flowkern's ops (imported lazily: triton is needed only when this backend runs)."""
