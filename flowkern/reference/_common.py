"""Helpers shared by the reference ops."""
import torch


def row_sum(values: torch.Tensor) -> torch.Tensor:
    """Per-row sum over every non-batch dim, in float32 (float64 for float64 input)."""
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    values = values.to(acc)
    return values.sum(dim=tuple(range(1, values.dim()))) if values.dim() > 1 else values
