"""vmap (torch.func) rules for flowkern's row-wise kernel ops.

Every flowkern kernel treats dim 0 as independent rows, so a vmapped dim folds into the rows:
move it to the front, merge it with the batch (unbatched inputs are expanded), run the op
once, and split the rows again. This is what lets torch.func.jacrev / vmap run the fused
kernels without PyTorch's slow per-sample fallback.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _fold(t: Optional[torch.Tensor], dim: Optional[int], size: int) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)
    return t.reshape(size * t.shape[1], *t.shape[2:]).contiguous()


def _unfold(t: torch.Tensor, size: int):
    if t.numel() == 0 and t.dim() == 1 and t.shape[0] == 0:
        return t, None  # an empty placeholder output (e.g. an unsaved factor)
    return t.reshape(size, t.shape[0] // size, *t.shape[1:]), 0


def register_row_vmap(op_name: str, tensor_args: Sequence[int]) -> None:
    """Registers the fold-into-rows vmap rule for op `op_name`; tensor_args are the positions
    of its (optional) tensor arguments, every one of which has rows in dim 0."""
    tensor_args = frozenset(tensor_args)

    def rule(info, in_dims, *args):
        size = info.batch_size
        folded = [(_fold(a, d, size) if i in tensor_args else a) for i, (a, d) in enumerate(zip(args, in_dims))]
        outs = getattr(torch.ops.flowkern, op_name.split("::")[1])(*folded)
        if isinstance(outs, torch.Tensor):  # an op with one output
            return _unfold(outs, size)
        pairs = [_unfold(o, size) for o in outs]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

    torch.library.register_vmap(op_name, rule)
