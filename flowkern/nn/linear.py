"""Invertible linear layers: LU-parametrised dense maps over features (LinearLU) or channels
(Invertible1x1Conv, Glow's invertible 1x1 convolution), and fixed permutations (Permutation).

The learned weight is W = P L (U + diag(sign_s * exp(log_s))) (Kingma & Dhariwal, 2018), with
P a fixed permutation, L unit lower-triangular, U strictly upper-triangular and sign_s fixed
signs, so log|det W| = sum(log_s) costs O(C) instead of O(C^3), and the inverse is two
triangular solves instead of a matrix inverse.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..ops import _checks
from ..ops._autograd import eager_autograd
from .flow import FlowLayer


def _check_size(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _register_permutation(module: nn.Module, perm: torch.Tensor) -> None:
    """Registers `permutation` (persistent, so it is saved and a loaded model uses the saved one)
    and its cached inverse `inverse_permutation` (recomputed after every load_state_dict)."""
    module.register_buffer("permutation", perm.to(torch.long).clone())
    module.register_buffer("inverse_permutation", torch.argsort(module.permutation), persistent=False)
    module.register_load_state_dict_post_hook(_refresh_inverse_permutation)


def _refresh_inverse_permutation(mod: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook of _register_permutation (a module-level function, so that
    torch.save of a whole model pickles)."""
    perm = mod.permutation
    if not torch.equal(torch.sort(perm).values, torch.arange(perm.numel(), device=perm.device)):
        raise ValueError(f"the loaded permutation of {type(mod).__name__} is not a permutation of "
                         f"0..{perm.numel() - 1}: {perm.tolist()}")
    mod.inverse_permutation = torch.argsort(perm)


def _zero_logdet(x: torch.Tensor, logdet: Optional[torch.Tensor]) -> torch.Tensor:
    """The running log-det of a volume-preserving layer: unchanged (a new tensor), or zeros."""
    logdet = _checks.running_logdet(logdet, x)
    if logdet is None:
        return torch.zeros(x.shape[0], dtype=_checks.logdet_dtype(x.dtype), device=x.device)
    return logdet.clone()


def _random_orthogonal(n: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64) from torch's global RNG."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r))
    return q * torch.where(signs == 0, 1.0, signs)  # Q diag(sign(diag R)) is Haar-distributed


class _LULayer(FlowLayer):
    """The LU arithmetic shared by LinearLU and Invertible1x1Conv, on rows of `size` entries.

    Parameters: `lower` (only its strict lower triangle is used), `upper` (only its strict upper
    triangle is used), `log_s`. Buffers: `permutation` (P as indices: (P M)[i] = M[perm[i]]) and
    `sign_s`, both fixed and saved in the state dict.
    """

    def __init__(self, size: int):
        super().__init__()
        self._size = size
        with torch.no_grad():
            p, lower, upper = torch.linalg.lu(_random_orthogonal(size))
            s = torch.diagonal(upper)
        dtype = torch.get_default_dtype()
        self.lower = nn.Parameter(torch.tril(lower, -1).to(dtype))
        self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
        self.log_s = nn.Parameter(s.abs().log().to(dtype))
        self.register_buffer("sign_s", torch.sign(s).to(dtype))
        _register_permutation(self, p.argmax(dim=1))  # P[i, perm[i]] = 1

    def _factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """L (unit lower-triangular) and U + diag(sign_s * exp(log_s)) (upper-triangular)."""
        eye = torch.eye(self._size, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    @property
    def weight(self) -> torch.Tensor:
        """W = P L (U + diag(sign_s * exp(log_s))), shape (size, size); differentiable."""
        lower, upper = self._factors()
        return (lower @ upper).index_select(0, self.permutation)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        # Half inputs run in the parameters' float32; float64 inputs stay float64.
        return torch.promote_types(x.dtype, self.log_s.dtype)

    def _solve_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """x with x @ W^T = rows, for rows (M, size): W^T = U^T L^T P^T, so x U^T L^T = rows P,
        and (rows P)[:, j] = rows[:, inverse_perm[j]]; then two triangular solves."""
        # Half and bfloat16 solve in float32 (no triangular-solve kernels for them), rounded once.
        dtype = torch.promote_types(rows.dtype, torch.float32)
        lower, upper = (f.to(dtype) for f in self._factors())
        h = rows.to(dtype).index_select(1, self.inverse_permutation)
        h = torch.linalg.solve_triangular(lower.mT, h, upper=True, left=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper.mT, h, upper=False, left=False).to(rows.dtype)

    def _logdet(self, x: torch.Tensor, logdet: Optional[torch.Tensor], positions: int,
                inverse: bool) -> torch.Tensor:
        running = _checks.running_logdet(logdet, x)
        dtype = _checks.logdet_dtype(x.dtype)
        ld = self.log_s.to(dtype).sum() * positions
        if inverse:
            ld = -ld
        ld = ld.expand(x.shape[0])
        return ld.contiguous() if running is None else running + ld

    def _check_device(self, name: str, x: torch.Tensor) -> None:
        if x.device != self.log_s.device:
            raise ValueError(f"{name} is on {x.device} but the layer's parameters are on {self.log_s.device}")


class LinearLU(_LULayer):
    """An invertible dense layer y = x @ W^T on (B, features), W LU-parametrised:

        W = P L (U + diag(sign_s * exp(log_s))),   log|det W| = sum(log_s) per row.

    P (a fixed permutation) and sign_s are buffers saved in the state dict; L's strict lower
    part, U's strict upper part and log_s are learned. W starts as a random orthogonal matrix
    (drawn from torch's global RNG: seed it with torch.manual_seed), so log-det 0 at init.
    The inverse is two triangular solves. Context is ignored.
    """

    def __init__(self, features: int):
        super().__init__(_check_size("features", features))
        self.features = features

    def _check(self, name: str, x: torch.Tensor) -> None:
        _checks.tensor(name, x, min_dim=2)
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"{name} must have shape (batch, {self.features}), got {tuple(x.shape)}")
        self._check_device(name, x)

    def forward(self, x, context=None, logdet=None):
        self._check("x", x)
        dtype = self._compute_dtype(x)
        y = x.to(dtype) @ self.weight.to(dtype).mT
        return y.to(x.dtype), self._logdet(x, logdet, 1, inverse=False)

    def inverse(self, z, context=None, logdet=None):
        self._check("z", z)
        x = self._solve_rows(z.to(self._compute_dtype(z)))
        return x.to(z.dtype), self._logdet(z, logdet, 1, inverse=True)

    def extra_repr(self) -> str:
        return f"features={self.features}"


class Invertible1x1Conv(_LULayer):
    """Glow's invertible 1x1 convolution on (B, C, *spatial) (any number >= 1 of spatial dims):
    every spatial position's channel vector is mapped by the same LU-parametrised W (see
    LinearLU), so log|det J| = (number of spatial positions) * sum(log_s) per row.

    W starts as a random orthogonal matrix from torch's global RNG (log-det 0 at init). The
    event shape depends on the spatial size, so a Flow starting with this layer needs base=...
    Context is ignored.
    """

    def __init__(self, channels: int):
        super().__init__(_check_size("channels", channels))
        self.channels = channels

    def _check(self, name: str, x: torch.Tensor) -> None:
        _checks.tensor(name, x, min_dim=2)
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(f"{name} must have shape (batch, {self.channels}, *spatial) with at least one "
                             f"spatial dim, got {tuple(x.shape)}")
        self._check_device(name, x)

    def forward(self, x, context=None, logdet=None):
        self._check("x", x)
        dtype = self._compute_dtype(x)
        # W @ (B, C, N) keeps the channels-first layout (faster here than a conv2d or a
        # channels-last matmul).
        positions = x.shape[2:].numel()
        y = torch.matmul(self.weight.to(dtype), x.to(dtype).reshape(x.shape[0], self.channels, positions))
        return y.reshape(x.shape).to(x.dtype), self._logdet(x, logdet, positions, inverse=False)

    def inverse(self, z, context=None, logdet=None):
        self._check("z", z)
        dtype = self._compute_dtype(z)
        # The triangular solves run on channels-last rows (B * positions, C): one 2-D solve,
        # no per-sample copies of the factors.
        positions = z.shape[2:].numel()
        rows = z.to(dtype).movedim(1, -1).reshape(z.shape[0] * positions, self.channels)
        x = self._solve_rows(rows).reshape(*z.shape[:1], *z.shape[2:], self.channels).movedim(-1, 1)
        return x.contiguous().to(z.dtype), self._logdet(z, logdet, positions, inverse=True)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class _PermuteColumns(torch.autograd.Function):
    """x.index_select(1, perm) whose backward gathers with the inverse permutation. Autograd's own
    backward of index_select fills a zero tensor and scatter-adds into it: two passes, and a
    scatter, where a gather does."""

    @staticmethod
    def forward(ctx, x, perm, inverse_perm):
        ctx.inverse_perm = inverse_perm
        return x.index_select(1, perm)

    @staticmethod
    def backward(ctx, grad):
        return grad.index_select(1, ctx.inverse_perm), None, None


def transpose_rows(perm: torch.Tensor) -> int:
    """a when perm is the transpose of an (a, n / a) grid, perm = arange(n).view(a, -1).t().flatten()
    (a = n / 2: "evens_first"; a = 2: its inverse), else 0. Such a permutation of dim 1 is a
    reshape-transpose copy, 3x as fast as index_select on a CPU (its backward too)."""
    n = perm.numel()
    if n < 4 or n % 2:
        return 0
    grid = torch.arange(n, device=perm.device)
    for a in (n // 2, 2):
        if torch.equal(perm, grid.view(a, n // a).t().flatten()):
            return a
    return 0


def permute_columns(x: torch.Tensor, perm: torch.Tensor, inverse_perm: torch.Tensor, rows: int = 0) -> torch.Tensor:
    """x.index_select(1, perm): a reshape-transpose when perm transposes a (rows, n / rows) grid
    (transpose_rows), else through _PermuteColumns where autograd will run its backward."""
    if rows:
        n = x.shape[1]
        return x.reshape(x.shape[0], rows, n // rows, *x.shape[2:]).transpose(1, 2).reshape(x.shape)
    if eager_autograd(x):
        return _PermuteColumns.apply(x, perm, inverse_perm)
    return x.index_select(1, perm)


def _refresh_transpose_rows(mod: nn.Module, incompatible_keys) -> None:
    """Permutation's load_state_dict post-hook: whether the loaded permutation is a grid transpose."""
    mod._rows = transpose_rows(mod.permutation)


class Permutation(FlowLayer):
    """Permutes dim 1 (the features of (B, F), or the channels of (B, C, ...)): y[:, i] = x[:, perm[i]].

    kind="reverse" reverses the order; kind="random" draws a permutation from torch's global RNG
    at construction; kind="evens_first" puts the even indices first, then the odd ones (it turns
    alternating masks into two contiguous halves); or pass the permutation itself, a 1-D integer
    tensor holding 0..n-1 once each. The permutation is a persistent buffer: it is saved in the
    state dict, and a model loaded from one uses the saved permutation. log-det 0. Context is
    ignored.
    """

    KINDS = ("reverse", "random", "evens_first")

    def __init__(self, features_or_channels: int, kind: Union[str, torch.Tensor] = "reverse"):
        super().__init__()
        n = _check_size("features_or_channels", features_or_channels)
        self.features = n
        if isinstance(kind, torch.Tensor):
            if kind.dtype.is_floating_point or kind.dtype == torch.bool or kind.shape != (n,) or not torch.equal(
                    torch.sort(kind.cpu()).values, torch.arange(n)):
                raise ValueError(f"a given permutation must be an integer tensor holding 0..{n - 1} once each, "
                                 f"got {kind.dtype} of shape {tuple(kind.shape)}")
            self.kind, perm = "given", kind.cpu()
        else:
            _checks.choice("kind", kind, self.KINDS)
            self.kind = kind
            if kind == "reverse":
                perm = torch.arange(n - 1, -1, -1)
            elif kind == "random":
                perm = torch.randperm(n)
            else:
                perm = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])
        _register_permutation(self, perm)
        # Whether the permutation transposes a (rows, n / rows) grid (its inverse then transposes
        # the (n / rows, rows) one), cached; re-read after every load_state_dict.
        self._rows = transpose_rows(self.permutation)
        self.register_load_state_dict_post_hook(_refresh_transpose_rows)

    def _check(self, name: str, x: torch.Tensor) -> None:
        _checks.tensor(name, x, min_dim=2)
        if x.shape[1] != self.features:
            raise ValueError(f"{name} must have shape (batch, {self.features}, ...), got {tuple(x.shape)}")
        if x.device != self.permutation.device:
            raise ValueError(f"{name} is on {x.device} but the layer's permutation is on {self.permutation.device}")

    def forward(self, x, context=None, logdet=None):
        self._check("x", x)
        return permute_columns(x, self.permutation, self.inverse_permutation, self._rows), _zero_logdet(x, logdet)

    def inverse(self, z, context=None, logdet=None):
        self._check("z", z)
        inverse_rows = self.features // self._rows if self._rows else 0
        return permute_columns(z, self.inverse_permutation, self.permutation, inverse_rows), _zero_logdet(z, logdet)

    def extra_repr(self) -> str:
        return f"features={self.features}, kind={self.kind!r}"
