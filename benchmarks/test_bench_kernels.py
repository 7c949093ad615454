"""pytest-benchmark suite of every kernel op: `make bench-pytest` (or `python -m pytest
benchmarks/test_bench_kernels.py --benchmark-only`).

Each op, at MNIST sizes, forward, inverse (where the op has one) and forward+backward
(autograd.grad of every floating input), for flowkern (every kernel backend for the device),
the eager reference and torch.compile(reference): the comparisons of `python -m benchmarks`,
in pytest-benchmark's format, for its statistics, --benchmark-json and --benchmark-compare
across commits. One group per (op, case, direction), so the table compares implementations.
Never part of `make test`: no test asserts a time.

additive_coupling is not here: it has no kernel (its reference is the implementation).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch

import flowkern
from flowkern.ops import (actnorm, affine_coupling, affine_coupling_merge, batchnorm_flow, batchnorm_flow_train,
                          dequantize_logit, dequantize_logit_inverse, gaussian_nll, rq_spline)
from flowkern.reference import (actnorm_ref, affine_coupling_ref, batchnorm_flow_ref, dequantize_logit_inverse_ref,
                                dequantize_logit_ref, gaussian_nll_ref, rq_spline_ref)
from flowkern.reference.affine_coupling import affine_coupling_merge_ref
from flowkern.reference.batchnorm_flow import batchnorm_flow_train_ref

from .common import sync
from .kernels import implementations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TARGET_S = 0.2  # the time each benchmark spends measuring (rounds are sized to it)


@dataclass
class Case:
    """One op at one size. inputs() -> (tensors, kwargs); directions holds "fwd" and
    "fwd+bwd" (gradients of every floating tensor), and "inv" when the op has an inverse:
    inverse=True, or a separate op (inv_op, inv_ref, inv_inputs)."""
    op_name: str
    label: str
    op: Callable
    ref: Callable
    inputs: Callable[[], tuple[list, dict]]
    inverse_kwarg: bool = True
    backward: bool = True
    inv: Optional[tuple[Callable, Callable, Callable[[], tuple[list, dict]]]] = None
    fwd_inputs: Optional[Callable[[], tuple[list, dict]]] = None  # forward-only inputs, when they differ
    directions: list = field(default_factory=list)

    def __post_init__(self):
        self.directions = ["fwd"] + (["inv"] if self.inverse_kwarg or self.inv else []) + (
            ["fwd+bwd"] if self.backward else [])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE)


def _affine(b, d, scale):
    def inputs():
        g = _gen()
        return [_randn(b, d, gen=g), _randn(b, d, gen=g), _randn(b, d, gen=g)], {"scale": scale}
    return Case("affine_coupling", f"{b}x{d} {scale}", affine_coupling, affine_coupling_ref, inputs)


def _affine_merge(b, d, scale):
    """The coupling layer's transform and merge in one pass, on the two halves of a row (views)
    and the conditioner's [shift | raw scale] output, as RealNVP calls it."""
    def inputs():
        g = _gen()
        row = _randn(b, d, gen=g)
        return [row[:, : d // 2], row[:, d // 2:], _randn(b, 2 * (d - d // 2), gen=g)], {"scale": scale}
    return Case("affine_coupling_merge", f"{b}x{d} {scale}", affine_coupling_merge, affine_coupling_merge_ref, inputs)


def _spline(b, d, bins=8):
    def inputs():
        g = _gen()
        return [_randn(b, d, gen=g, scale=1.5), _randn(b, d, 3 * bins - 1, gen=g)], {"bins": bins, "bound": 3.0}
    return Case("rq_spline", f"{b}x{d} K={bins}", rq_spline, rq_spline_ref, inputs)


def _shape_label(shape) -> str:
    return "x".join(map(str, shape))


def _actnorm(shape):
    def inputs():
        g = _gen()
        return [_randn(*shape, gen=g), _randn(shape[1], gen=g, scale=0.1), _randn(shape[1], gen=g, scale=0.1)], {}
    return Case("actnorm", _shape_label(shape), actnorm, actnorm_ref, inputs)


def _batchnorm_eval(shape):
    """Given statistics (evaluation mode): forward, inverse, gradients to x, statistics and parameters."""
    def inputs():
        g = _gen()
        x = _randn(*shape, gen=g)
        dims = [0] + list(range(2, len(shape)))
        return [x, x.mean(dims), x.var(dims) + 0.5, _randn(shape[1], gen=g, scale=0.1),
                _randn(shape[1], gen=g, scale=0.1)], {}
    return Case("batchnorm_flow", _shape_label(shape), batchnorm_flow, batchnorm_flow_ref, inputs)


def _batchnorm_train(shape):
    """Training mode (batch statistics, gradients through them): no inverse (sampling uses the
    running statistics, batchnorm_flow's)."""
    def inputs():
        g = _gen()
        return [_randn(*shape, gen=g), _randn(shape[1], gen=g, scale=0.1), _randn(shape[1], gen=g, scale=0.1)], {}
    return Case("batchnorm_flow_train", _shape_label(shape), batchnorm_flow_train, batchnorm_flow_train_ref, inputs,
                inverse_kwarg=False)


def _dequantize(shape):
    """Forward: the op draws its noise from a seed; forward+backward: given noise that needs its
    gradient (variational dequantization); inverse: dequantize_logit_inverse on logits."""
    def with_noise():
        g = _gen()
        return [torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(DEVICE),
                torch.rand(shape, generator=g).to(DEVICE)], {}

    def seeded():
        return [with_noise()[0][0]], {"seed": 1234}

    def logits():
        return [_randn(*shape, gen=_gen(), scale=3.0)], {}
    return Case("dequantize_logit", _shape_label(shape), dequantize_logit, dequantize_logit_ref, with_noise,
                inverse_kwarg=False, inv=(dequantize_logit_inverse, dequantize_logit_inverse_ref, logits),
                fwd_inputs=seeded)


def _gaussian_nll(shape):
    def inputs():
        g = _gen()
        return [_randn(*shape, gen=g), _randn(shape[0], gen=g)], {}
    return Case("gaussian_nll", _shape_label(shape), gaussian_nll, gaussian_nll_ref, inputs, inverse_kwarg=False)


FLAT, IMAGE = (256, 784), (256, 16, 14, 14)  # (B, D) as RealNVP sees MNIST; Glow's first level
CASES = ([_affine(256, 392, s) for s in ("sigmoid", "exp")] + [_affine(256, 784, s) for s in ("sigmoid", "exp", "tanh")]
         + [_affine_merge(256, 784, "sigmoid"), _spline(256, 392), _spline(256, 784)]
         + [_actnorm(FLAT), _actnorm(IMAGE), _batchnorm_eval(FLAT), _batchnorm_eval(IMAGE),
            _batchnorm_train(FLAT), _batchnorm_train(IMAGE), _dequantize(FLAT), _gaussian_nll(FLAT),
            _gaussian_nll(IMAGE)])

# One set of implementations per op (its torch.compile(reference) recompiles per case and
# direction; common.compiled raises dynamo's recompile limit so that none falls back to eager).
_IMPLS: dict = {}


def impls_of(op: Callable, ref: Callable) -> dict:
    if op not in _IMPLS:
        _IMPLS[op] = implementations(DEVICE, op, ref)
    return _IMPLS[op]


IMPL_NAMES = list(implementations(DEVICE, gaussian_nll, gaussian_nll_ref))  # the same names for every op
PARAMS = [pytest.param(case, direction, impl, id=f"{case.op_name}-{case.label.replace(' ', '-')}-{direction}-{impl}")
          for case in CASES for direction in case.directions for impl in IMPL_NAMES]


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("case, direction, impl", PARAMS)
def test_op(benchmark, case: Case, direction: str, impl: str):
    if direction == "inv" and case.inv is not None:
        op, ref, make = case.inv
        args, kwargs = make()
    else:
        op, ref = case.op, case.ref
        make = case.fwd_inputs if direction == "fwd" and case.fwd_inputs else case.inputs
        args, kwargs = make()
        if direction == "inv":
            kwargs = {**kwargs, "inverse": True}
    impls = impls_of(op, ref)
    if impl not in impls:
        pytest.skip(f"{impl} is not available here")
    fn, backend = impls[impl]
    benchmark.group = f"{case.op_name} {case.label} {direction}"

    if direction == "fwd+bwd":
        args = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
        leaves = [a for a in args if a.requires_grad]
        with flowkern.backend(backend):
            outs = _as_tuple(fn(*args, **kwargs))[:2]  # (out, logdet): the extra outputs of training mode too
        grads = [torch.randn_like(o) for o in outs]

        def run():
            outs = _as_tuple(fn(*args, **kwargs))[:2]
            torch.autograd.grad(outs, leaves, grads)
            sync(DEVICE)
    else:
        def run():
            fn(*args, **kwargs)
            sync(DEVICE)

    with flowkern.backend(backend):
        run()  # warm-up (and compilation) outside the timing
        t0 = time.perf_counter()
        run()
        once = max(time.perf_counter() - t0, 1e-6)
        benchmark.pedantic(run, rounds=int(min(500, max(5, TARGET_S / once))), iterations=1, warmup_rounds=1)
