"""Property-based fuzzing (hypothesis) of every public op on every backend.

Each example draws a shape (0 and 1 rows included, widths 1 to 4096, image-like shapes for the
per-channel ops), a memory layout (contiguous, a strided slice, a transposed copy, column slices
of a wider buffer, rows broadcast from one with stride 0), a dtype and a seed, plus the
magnitudes of every input (log-uniform between drawn powers of ten: |x| up to 1e30, parameters up
to 1e4, exact zeros). The tensors are made from the seed, so an example stays small for
hypothesis to shrink and cheap to replay.

Properties, per op and backend:
  finite      finite inputs in the op's finite range (docs/ops.md) give finite outputs, log-dets
              and gradients; a kernel backend also agrees with the float64 reference on the same
              inputs: error at most 2x the reference's own in the kernel's dtype, plus what
              perturbing every input (and the incoming gradients) by a few ulps moves the float64
              result (the problem's condition: cancellation, sums, points next to a knot or a
              cell edge), plus the few errors a kernel makes by design that no perturbation shows
              (OpDef.extra: each says why)
  roundtrip   inverse(forward(x)) == x within the rounding of the intermediate, log-dets cancel
  nan_rows    NaN / +-inf written into some rows: the other rows' outputs, log-dets and
              gradients are bit-identical to a clean run, and the poisoned rows show NaN (inf)
              where the op says they should; per-channel statistics (batchnorm_flow_train,
              batch_stats) mix rows by definition: there the poisoned channel is NaN for every
              row, the other channels are untouched
and, at the end, offsets past 2^31 elements on views whose rows lie 2^31 elements apart.

Examples are derandomized (the same inputs every run) and few per property; set
FLOWKERN_PROPERTY_EXAMPLES=<factor> to scale them all (e.g. 10 for a long fuzzing session) and
FLOWKERN_PROPERTY_REPORT=1 to print how many examples each property ran.
"""
from __future__ import annotations

import collections
import math
import os
from typing import Dict

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import flowkern
from flowkern import ops
from flowkern import reference as R
from flowkern.reference.affine_coupling import SCALES, affine_coupling_merge_ref

from conftest import kernel_backends
# The ops' calls, conditions and checks (shared with the per-op tests' fixed cases):
from tolerances import (EPS, INVERTIBLE, KERNEL_OPS, OPS, REFERENCE_OPS, TINY, Case, OpDef, broadcast_rows,
                        check_finite_and_agree, check_roundtrip, compute_dtype, default_arg_dtype,
                        quantized, run)

# ------------------------------------------------------------------------------------------------
# Backends, example counts, bookkeeping

SCALE = float(os.environ.get("FLOWKERN_PROPERTY_EXAMPLES", "1"))
COUNTS: Dict[str, int] = collections.Counter()


def backend_params(kernels_only: bool = False):
    """(backend, device) pytest params: the reference, the compiled op and Triton where they run."""
    return kernel_backends(with_reference=not kernels_only)


def interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def examples(base: int, backend: str, device: str) -> int:
    """Examples per property: Triton under the interpreter runs a handful."""
    n = max(3, base // 4) if interpreted(backend, device) else base
    return max(1, int(n * SCALE))


def fuzz(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    if os.environ.get("FLOWKERN_PROPERTY_REPORT"):
        # At the very end: output written while a test's fixtures tear down is captured.
        request.config.add_cleanup(_print_counts)
    yield


def _print_counts():
    if COUNTS:
        print("\nproperty examples run (valid examples, per property and backend):")
        for k, v in sorted(COUNTS.items()):
            print(f"  {k:<52} {v}")


def run_property(name: str, backend: str, device: str, base: int, strategy, body) -> None:
    """Runs body(case, data) over `strategy` (derandomized), counting the examples that passed
    the op's validity filter; fails when fewer than half of the examples asked for were valid."""
    n = examples(base, backend, device)
    key = f"{name}[{backend}]"
    COUNTS[key] += 0

    @fuzz(n)
    @given(strategy, st.data())
    def prop(case, data):
        note(f"case: {case.describe()}")
        body(case, data)
        COUNTS[key] += 1

    before = COUNTS[key]
    prop()
    ran = COUNTS[key] - before
    # Hypothesis re-runs the failing example on failure; on success each valid example counts once.
    assert ran >= max(1, n // 2), f"{key}: only {ran} of {n} examples were valid inputs"


# ------------------------------------------------------------------------------------------------
# Inputs

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "strided", "transposed", "broadcast", "rowslice")


def dtypes_for(backend: str, device: str):
    """Triton computes in float32 (float64 raises; the interpreter has no half types)."""
    if backend == "triton":
        return (torch.float32,) if device == "cpu" else (torch.float32, torch.float16, torch.bfloat16)
    return FLOATS


def log_uniform(g: torch.Generator, shape, lo: float, hi: float, zeros: float = 0.05, signed: bool = True):
    """Magnitudes log-uniform in [10^lo, 10^hi], random signs, a fraction of exact zeros (float64)."""
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    v = torch.pow(10.0, lo + (hi - lo) * u)
    if signed:
        v = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.5, -v, v)
    if zeros:
        v = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < zeros, torch.zeros_like(v), v)
    return v


@st.composite
def exponent_range(draw, lo: int, hi: int):
    """A [lo_exp, hi_exp] sub-range of powers of ten: narrow or wide, anywhere in [lo, hi]."""
    a = draw(st.integers(lo, hi))
    b = draw(st.integers(lo, hi))
    return (min(a, b), max(a, b))


def widths(max_width: int):
    special = [w for w in (31, 33, 127, 129, 784, 1000, 4096) if w <= max_width]
    return st.one_of(st.integers(1, 9), st.sampled_from(special), st.integers(1, max_width))


@st.composite
def shapes(draw, *, channels: bool, max_elems: int, max_width: int = 4096, min_rows: int = 0):
    """(B, D), (B,) (elementwise ops), or (B, C, *spatial) with B in {0, 1, 2, 3, 5}."""
    rows = draw(st.sampled_from([r for r in (0, 1, 1, 2, 3, 5) if r >= min_rows]))
    kind = draw(st.sampled_from(["flat", "flat", "image"] + ([] if channels else ["vector"])))
    if kind == "vector":
        return (rows,)
    if kind == "flat":
        width = draw(widths(max_width))
        return (rows, width)
    c = draw(st.integers(1, 6))
    spatial = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=2)))
    shape = (rows, c) + spatial
    assume(math.prod(shape) <= max_elems)
    return shape


def limit_rows(shape, max_elems: int):
    """Fewer rows when a wide shape would exceed max_elems (interpreted Triton is slow)."""
    per_row = math.prod(shape[1:])
    rows = shape[0]
    while rows > 1 and rows * per_row > max_elems:
        rows -= 1
    return (rows,) + tuple(shape[1:])


# ------------------------------------------------------------------------------------------------
# The ops: how to draw an example, call the op and its reference, and what to expect


def maybe_logdet(draw, g: torch.Generator, t: Dict[str, torch.Tensor], shape: tuple) -> None:
    """Half the cases carry a running log-det (B,) of moderate size."""
    if draw(st.booleans()):
        t["logdet"] = log_uniform(g, shape[:1], -3, 5)


@st.composite
def common(draw, backend, device, *, channels=False, max_elems=16384, max_width=4096, min_rows=0):
    interp = interpreted(backend, device)
    if interp:
        max_elems, max_width = min(max_elems, 2048), min(max_width, 1024)
    shape = limit_rows(draw(shapes(channels=channels, max_elems=max_elems, max_width=max_width,
                                   min_rows=min_rows)), max_elems)
    dtype = draw(st.sampled_from(dtypes_for(backend, device)))
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return shape, dtype, layout, seed


def max_exp(dtype) -> int:
    """Largest input magnitude (power of ten) to draw in dtype."""
    return 3 if dtype == torch.float16 else 30


# --- affine_coupling ----------------------------------------------------------------------------

@st.composite
def affine_cases(draw, backend, device):
    shape, dtype, layout, seed = draw(common(backend, device))
    scale = draw(st.sampled_from(SCALES))
    clamp = draw(st.sampled_from([2.0, 0.1, 1e-3, 10.0, 80.0])) if scale in ("tanh", "rational") else 2.0
    top = max_exp(dtype)
    x_exp = draw(exponent_range(-top, top))
    t_exp = draw(exponent_range(-top, top))
    # exp(s) must stay finite in float32 (|s| <= 80); the other scales take any s (softplus's
    # m = s up to 1e4 above 20).
    s_top = {"exp": 1, "sigmoid": 4, "tanh": 4, "softplus": 4, "rational": 4}[scale] if dtype != torch.float16 else 0
    s_exp = draw(exponent_range(-6, s_top))
    with_logdet = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    t = {"x": log_uniform(g, shape, *x_exp), "shift": log_uniform(g, shape, *t_exp),
         "scale_raw": log_uniform(g, shape, *s_exp)}
    if scale == "exp":
        t["scale_raw"] = t["scale_raw"].clamp(-80, 80) if dtype != torch.float16 else t["scale_raw"].clamp(-5, 5)
    if with_logdet:
        t["logdet"] = log_uniform(g, shape[:1], -3, 5)
    case = Case("affine_coupling", shape, dtype, layout, seed, t,
                dict(scale=scale, clamp=clamp, inverse=draw(st.booleans())))
    return broadcast_rows(case, ("x", "shift", "scale_raw"))


# --- affine_coupling_merge: the coupling transform and the merge with the kept half, on views

@st.composite
def merge_cases(draw, backend, device):
    shape, dtype, layout, seed = draw(common(backend, device, channels=True, max_elems=8192))
    scale = draw(st.sampled_from(SCALES))
    clamp = draw(st.sampled_from([2.0, 0.1, 80.0])) if scale in ("tanh", "rational") else 2.0
    top = max_exp(dtype)
    k = draw(st.integers(0, 4))
    s_top = {"exp": 1, "sigmoid": 4, "tanh": 4, "softplus": 4, "rational": 4}[scale] if dtype != torch.float16 else 0
    g = torch.Generator().manual_seed(seed)
    rows, c, spatial = shape[0], shape[1], tuple(shape[2:])
    shift = log_uniform(g, shape, *draw(exponent_range(-top, top)))
    raw = log_uniform(g, shape, *draw(exponent_range(-6, s_top)))
    if scale == "exp":
        raw = raw.clamp(-80, 80) if dtype != torch.float16 else raw.clamp(-5, 5)
    t = {"kept": log_uniform(g, (rows, k) + spatial, *draw(exponent_range(-top, top))),
         "x": log_uniform(g, shape, *draw(exponent_range(-top, top))),
         "params": torch.cat([shift, raw], dim=1)}
    maybe_logdet(draw, g, t, shape)
    case = Case("affine_coupling_merge", shape, dtype, layout, seed, t,
                dict(kept_first=draw(st.booleans()), scale=scale, clamp=clamp, inverse=draw(st.booleans())))
    return broadcast_rows(case, ("kept", "x", "params"))


# --- additive_coupling (a reference op on every backend) ---------------------------------------

@st.composite
def additive_cases(draw, backend, device):
    shape, dtype, layout, seed = draw(common(backend, device))
    top = max_exp(dtype)
    g = torch.Generator().manual_seed(seed)
    t = {"x": log_uniform(g, shape, *draw(exponent_range(-top, top))),
         "shift": log_uniform(g, shape, *draw(exponent_range(-top, top)))}
    maybe_logdet(draw, g, t, shape)
    case = Case("additive_coupling", shape, dtype, layout, seed, t, dict(inverse=draw(st.booleans())))
    return broadcast_rows(case, ("x", "shift"))


# --- rq_spline -----------------------------------------------------------------------------------

@st.composite
def spline_cases(draw, backend, device):
    interp = interpreted(backend, device)
    bins = draw(st.sampled_from([1, 2, 3, 8, 16, 64] if not interp else [1, 2, 5, 8]))
    per = 3 * bins - 1
    shape, dtype, layout, seed = draw(common(backend, device, max_elems=max(16, (200_000 if not interp else 8000)
                                                                             // per)))
    bound = draw(st.one_of(st.sampled_from([3.0, 1.0, 1e-3, 1e3]),
                           st.floats(1e-30, 1e30).map(lambda b: float(b))))
    if dtype == torch.float16:
        bound = min(max(bound, 1e-2), 1e2)
    top = max_exp(dtype)
    p_exp = draw(exponent_range(-4, 4 if dtype != torch.float16 else 3))
    g = torch.Generator().manual_seed(seed)
    # Inside the bound (uniform), far outside (log-uniform up to 1e30), exactly +-bound and 0.
    inside = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound
    outside = log_uniform(g, shape, math.log10(bound), max(top, math.log10(bound) + 1), zeros=0)
    pick = torch.rand(shape, generator=g, dtype=torch.float64)
    x = torch.where(pick < 0.7, inside, outside)
    x = torch.where(pick > 0.95, torch.full_like(x, bound) * torch.sign(inside + 1e-300), x)
    x = torch.where((pick > 0.7) & (pick < 0.72), torch.zeros_like(x), x)
    t = {"x": x, "params": log_uniform(g, shape + (per,), *p_exp)}
    maybe_logdet(draw, g, t, shape)
    case = Case("rq_spline", shape, dtype, layout, seed, t, dict(bins=bins, bound=bound, inverse=draw(st.booleans())))
    return broadcast_rows(case, ("x", "params"))


# --- actnorm, batchnorm_flow, batchnorm_flow_train, batch_stats ---------------------------------

@st.composite
def channel_common(draw, backend, device, *, min_rows=0):
    shape, dtype, layout, seed = draw(common(backend, device, channels=True, min_rows=min_rows))
    return shape, dtype, layout, seed


@st.composite
def actnorm_cases(draw, backend, device):
    shape, dtype, layout, seed = draw(channel_common(backend, device))
    top = max_exp(dtype)
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    t = {"x": log_uniform(g, shape, *draw(exponent_range(-top, top))),
         "shift": log_uniform(g, (c,), *draw(exponent_range(-top, top))),
         "log_scale": log_uniform(g, (c,), *draw(exponent_range(-6, 1 if dtype != torch.float16 else 0)))}
    t["log_scale"] = t["log_scale"].clamp(-80, 80)
    maybe_logdet(draw, g, t, shape)
    case = Case("actnorm", shape, dtype, layout, seed, t, dict(inverse=draw(st.booleans())))
    return broadcast_rows(case, ("x",))


@st.composite
def batchnorm_cases(draw, backend, device):
    shape, dtype, layout, seed = draw(channel_common(backend, device))
    top = max_exp(dtype)
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    t = {"x": log_uniform(g, shape, *draw(exponent_range(-top, top))),
         "mean": log_uniform(g, (c,), *draw(exponent_range(-top, top))),
         "var": log_uniform(g, (c,), *draw(exponent_range(-top, top)), signed=False),
         "log_gamma": log_uniform(g, (c,), *draw(exponent_range(-6, 1 if dtype != torch.float16 else 0))).clamp(-80, 80),
         "beta": log_uniform(g, (c,), *draw(exponent_range(-top, top)))}
    maybe_logdet(draw, g, t, shape)
    eps = draw(st.sampled_from([1e-5, 1e-3, 1e-12, 1.0]))
    case = Case("batchnorm_flow", shape, dtype, layout, seed, t, dict(eps=eps, inverse=draw(st.booleans())))
    return broadcast_rows(case, ("x",))


@st.composite
def bn_train_cases(draw, backend, device):
    shape, dtype, layout, seed = draw(channel_common(backend, device, min_rows=1))
    # The batch variance squares x: |x| <= 1e15 keeps it finite in float32.
    top = 15 if dtype != torch.float16 else 1
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x_exp = draw(exponent_range(-top, top))
    t = {"x": log_uniform(g, shape, *x_exp) + log_uniform(g, (1, c) + (1,) * (len(shape) - 2), *x_exp),
         "log_gamma": log_uniform(g, (c,), *draw(exponent_range(-6, 1 if dtype != torch.float16 else 0))).clamp(-80, 80),
         "beta": log_uniform(g, (c,), *draw(exponent_range(-top, top)))}
    maybe_logdet(draw, g, t, shape)
    eps = draw(st.sampled_from([1e-5, 1e-3, 1.0]))
    case = Case("batchnorm_flow_train", shape, dtype, layout, seed, t, dict(eps=eps))
    return broadcast_rows(case, ("x",))


@st.composite
def batch_stats_cases(draw, backend, device):
    shape, dtype, layout, seed = draw(channel_common(backend, device, min_rows=1))
    top = 15 if dtype != torch.float16 else 1
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x_exp = draw(exponent_range(-top, top))
    t = {"x": log_uniform(g, shape, *x_exp) + log_uniform(g, (1, c) + (1,) * (len(shape) - 2), *x_exp)}
    case = Case("batch_stats", shape, dtype, layout, seed, t)
    return broadcast_rows(case, ("x",))


# --- gaussian_nll --------------------------------------------------------------------------------

@st.composite
def nll_cases(draw, backend, device):
    shape, dtype, layout, seed = draw(common(backend, device))
    # Sums of 4096 squares: |z| <= 1e15 keeps them finite in float32.
    top = 15 if dtype != torch.float16 else 1
    g = torch.Generator().manual_seed(seed)
    t = {"z": log_uniform(g, shape, *draw(exponent_range(-top, top)))}
    if draw(st.booleans()):
        t["logdet"] = log_uniform(g, shape[:1], *draw(exponent_range(-3, 30)))
    bits = draw(st.booleans()) and math.prod(shape[1:]) > 0
    case = Case("gaussian_nll", shape, dtype, layout, seed, t, dict(bits_per_dim=bits))
    return broadcast_rows(case, ("z",))


# --- dequantize_logit, dequantize_logit_inverse and the reference preprocessing ops -----------

ALPHAS = [1e-6, 0.05, 1e-30, 0.0, 0.49]


@st.composite
def deq_logit_cases(draw, backend, device):
    shape, dtype, layout, seed = draw(common(backend, device))
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    extreme = torch.rand(shape, generator=g) < 0.2
    pixels = torch.where(extreme, torch.where(torch.rand(shape, generator=g) < 0.5, 0, 255).to(torch.uint8), pixels)
    t = {"x_uint8": pixels}
    alpha = draw(st.sampled_from(ALPHAS))
    kw = dict(alpha=alpha, dtype=dtype, case_dtype=dtype)
    given_noise = draw(st.booleans()) or alpha == 0.0
    if given_noise:
        u = torch.rand(shape, generator=g, dtype=torch.float64)
        edge = torch.rand(shape, generator=g)
        top = 1 - 2.0 ** -24 if dtype != torch.float64 else 1 - 2.0 ** -53
        # alpha = 0 is the plain logit: u = 0 at pixel 0 would be its pole (-inf), a valid output.
        low = 2.0 ** -24 if alpha == 0.0 else 0.0
        u = torch.where(edge < 0.1, torch.full_like(u, low), torch.where(edge > 0.9, torch.full_like(u, top), u))
        t["noise"] = u.clamp_min(low)
    else:
        kw["seed"] = draw(st.integers(-(2 ** 63), 2 ** 64 - 1))
    maybe_logdet(draw, g, t, shape)
    case = Case("dequantize_logit", shape, dtype, layout, seed, t, kw)
    return broadcast_rows(case, ("x_uint8", "noise"))


@st.composite
def deq_inverse_cases(draw, backend, device):
    shape, dtype, layout, seed = draw(common(backend, device))
    g = torch.Generator().manual_seed(seed)
    top = max_exp(dtype)
    t = {"y": log_uniform(g, shape, *draw(exponent_range(-top, top)))}
    maybe_logdet(draw, g, t, shape)
    case = Case("dequantize_logit_inverse", shape, dtype, layout, seed, t,
                dict(alpha=draw(st.sampled_from(ALPHAS))))
    return broadcast_rows(case, ("y",))


@st.composite
def logit_cases(draw, backend, device):
    shape, dtype, layout, seed = draw(common(backend, device))
    g = torch.Generator().manual_seed(seed)
    alpha = draw(st.sampled_from([1e-6, 0.05, 1e-30, 0.49]))
    inverse = draw(st.booleans())
    if inverse:
        top = max_exp(dtype)
        v = log_uniform(g, shape, *draw(exponent_range(-top, top)))
    else:
        v = torch.rand(shape, generator=g, dtype=torch.float64)
        edge = torch.rand(shape, generator=g, dtype=torch.float64)
        v = torch.where(edge < 0.1, torch.zeros_like(v), torch.where(edge > 0.9, torch.ones_like(v), v))
    t = {"v": v}
    maybe_logdet(draw, g, t, shape)
    case = Case("logit", shape, dtype, layout, seed, t, dict(alpha=alpha, inverse=inverse))
    return broadcast_rows(case, ("v",))


@st.composite
def quantize_cases(draw, backend, device):
    shape, dtype, layout, seed = draw(common(backend, device))
    g = torch.Generator().manual_seed(seed)
    top = max_exp(dtype)
    t = {"v": torch.where(torch.rand(shape, generator=g) < 0.8, torch.rand(shape, generator=g, dtype=torch.float64),
                          log_uniform(g, shape, *draw(exponent_range(-top, top))))}
    maybe_logdet(draw, g, t, shape)
    case = Case("quantize", shape, dtype, layout, seed, t)
    return broadcast_rows(case, ("v",))


@st.composite
def dequantize_cases(draw, backend, device):
    shape, dtype, layout, seed = draw(common(backend, device))
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    u = torch.where(torch.rand(shape, generator=g) < 0.1, torch.full_like(u, 1 - 2.0 ** -24), u)
    t = {"x_uint8": torch.randint(0, 256, shape, generator=g, dtype=torch.uint8), "noise": u}
    maybe_logdet(draw, g, t, shape)
    case = Case("dequantize", shape, dtype, layout, seed, t, dict(dtype=dtype))
    return broadcast_rows(case, ("x_uint8", "noise"))


# ------------------------------------------------------------------------------------------------
# Running a case


# ------------------------------------------------------------------------------------------------
# The properties


DRAWS = {"affine_coupling": affine_cases, "affine_coupling_merge": merge_cases, "additive_coupling": additive_cases,
         "rq_spline": spline_cases, "actnorm": actnorm_cases, "batchnorm_flow": batchnorm_cases,
         "batchnorm_flow_train": bn_train_cases, "batch_stats": batch_stats_cases, "gaussian_nll": nll_cases,
         "dequantize_logit": deq_logit_cases, "dequantize_logit_inverse": deq_inverse_cases, "logit": logit_cases,
         "quantize": quantize_cases, "dequantize": dequantize_cases}
for _name, _draw in DRAWS.items():  # tolerances.OPS knows how to call an op; here, how to draw one
    OPS[_name].draw = _draw


def check_nan_rows(opdef: OpDef, case: Case, backend: str, device: str, data) -> None:
    case = quantized(case, opdef)
    rows = case.shape[0]
    floats = [k for k in opdef.row_args if k in case.tensors and case.tensors[k].is_floating_point()
              and case.tensors[k].numel() > 0]
    assume(rows >= 1 and floats)
    if case.layout == "broadcast":
        case.layout = "contiguous"  # a poisoned row must not be a view of the others
    arg = data.draw(st.sampled_from(floats), label="poisoned input")
    value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="value")
    bad_rows = data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=max(1, rows - 1), unique=True),
                         label="rows")
    t = case.tensors[arg]
    g = torch.Generator().manual_seed(case.seed + 3)
    mask = torch.zeros(t.shape, dtype=torch.bool)
    flat = mask.view(rows, -1)
    for r in bad_rows:
        k = int(torch.randint(1, min(flat.shape[1], 4) + 1, (), generator=g))
        cols = torch.randperm(flat.shape[1], generator=g)[:k]
        flat[r, cols] = True
    if opdef.name in ("dequantize_logit", "dequantize") and arg == "noise":
        # Documented: noise values are checked (one pass) and a NaN / out-of-range noise raises.
        dirty = dict(case.tensors)
        dirty[arg] = torch.where(mask, value, t)
        with pytest.raises(ValueError, match="noise"):
            run(opdef, case, backend, device, tensors=dirty)
        return
    clean = run(opdef, case, backend, device)
    dirty_t = dict(case.tensors)
    dirty_t[arg] = torch.where(mask, torch.tensor(value, dtype=torch.float64), t)
    dirty = run(opdef, case, backend, device, tensors=dirty_t)
    poisoned = torch.zeros(rows, dtype=torch.bool)
    poisoned[bad_rows] = True
    ok = ~poisoned

    def same(a, b):
        return torch.equal(torch.nan_to_num(a, nan=1.2345), torch.nan_to_num(b, nan=1.2345)) and \
            torch.equal(a.isnan(), b.isnan())

    if opdef.coupled_rows and arg == "x":
        # Statistics over the batch: every row of a poisoned channel is NaN/inf (the statistics
        # are), the log-det of every row too (a sum over the channels), other channels untouched.
        chans = mask.reshape(rows, mask.shape[1], -1).any(2).any(0)
        for i, kind in enumerate(opdef.out_kinds):
            o, c = dirty.outs[i], clean.outs[i]
            if kind == "chan":
                assert same(o[~chans], c[~chans]), f"{case.op}: clean channels of output {i} changed"
                assert not torch.isfinite(o[chans]).any(), f"{case.op}: a poisoned channel's statistic is finite"
            elif kind == "elem":
                assert same(o[:, ~chans], c[:, ~chans]), f"{case.op}: clean channels of output {i} changed"
                assert not torch.isfinite(o[:, chans]).any(), f"{case.op}: a poisoned channel stayed finite"
            else:
                assert not torch.isfinite(o).any(), f"{case.op}: a log-det stayed finite"
        return
    for i, kind in enumerate(opdef.out_kinds):
        o, c = dirty.outs[i], clean.outs[i]
        if kind == "chan":  # statistics of x: a poisoned running log-det does not reach them
            assert same(o, c), f"{case.op}: output {i} changed by a {value} in {arg}"
            continue
        assert same(o[ok], c[ok]), f"{case.op}: output {i} of clean rows changed by a {value} in {arg}"
    for k, gd in dirty.grads.items():
        gc = clean.grads.get(k)
        if gd is None or gc is None or k not in opdef.row_args:
            continue
        assert same(gd[ok], gc[ok]), f"{case.op}: grad of {k} in clean rows changed by a {value} in {arg}"
    # The poisoned rows show it: NaN input -> NaN, inf input -> not finite (unless the op clamps or
    # ignores that element, as documented).
    expect = expected_poison(opdef, case, arg, value, mask)
    if expect is not None:
        which, where = expect
        o = dirty.outs[which]
        if where is not None:  # those elements
            sel = o[where]
            if value != value:
                assert sel.isnan().all(), f"{case.op}: a NaN in {arg} did not give NaN: {sel[~sel.isnan()][:5]}"
            else:
                assert not torch.isfinite(sel).any(), f"{case.op}: an inf in {arg} gave finite {sel[torch.isfinite(sel)][:5]}"
        else:  # somewhere in each poisoned row
            sel = o[poisoned].reshape(len(bad_rows), -1)
            hit = sel.isnan().any(1) if value != value else (~torch.isfinite(sel)).any(1)
            assert hit.all(), f"{case.op}: a {value} in {arg} left a poisoned row of output {which} clean"


def expected_poison(opdef, case, arg, value, mask):
    """(output index, element mask or None for the poisoned rows) that must be NaN (for a NaN) or
    non-finite (for +-inf), or None where the op legitimately absorbs the value."""
    name = opdef.name
    if name == "gaussian_nll":
        return 0, None
    if name == "affine_coupling_merge":
        if arg == "logdet":
            return 1, None
        return (0, None) if value != value or arg != "params" else None
    if arg == "logdet":
        return 1, None  # a running log-det passes through: its row's log-det
    if name == "quantize":
        return (0, mask) if value != value else None  # +-inf clamps to 0 / 255
    if name == "dequantize_logit_inverse":
        return (0, mask) if value != value else (1, None)  # pixels clamp; the log-det is -inf
    if name == "rq_spline" and arg == "params":
        return None  # params of an element outside the bound are unused (identity tails)
    if name == "affine_coupling" and arg != "shift" and value != value:
        return 0, mask
    if name == "affine_coupling" and arg == "scale_raw":
        return None  # inf saturates sigmoid / tanh scales
    if name == "logit":
        return (0, mask) if value != value or not case.kwargs["inverse"] else None  # sigmoid(+-inf) is finite
    return 0, mask


# ------------------------------------------------------------------------------------------------
# The tests: one per (property, op, backend)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_finite_and_agree(op, backend, device):
    opdef = OPS[op]
    run_property(f"finite_and_agree.{op}", backend, device, 40, opdef.draw(backend, device),
                 lambda case, data: check_finite_and_agree(opdef, case, backend, device, assume))


@pytest.mark.parametrize("op", REFERENCE_OPS)
def test_finite_reference_ops(op):
    opdef = OPS[op]
    run_property(f"finite.{op}", "reference", "cpu", 30, opdef.draw("reference", "cpu"),
                 lambda case, data: check_finite_and_agree(opdef, case, "reference", "cpu", assume))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("op", [o for o in INVERTIBLE if OPS[o].kernels])
def test_roundtrip(op, backend, device):
    opdef = OPS[op]
    run_property(f"roundtrip.{op}", backend, device, 30, opdef.draw(backend, device),
                 lambda case, data: check_roundtrip(opdef, case, backend, device, assume))


def test_roundtrip_additive():
    opdef = OPS["additive_coupling"]
    run_property("roundtrip.additive_coupling", "reference", "cpu", 20, opdef.draw("reference", "cpu"),
                 lambda case, data: check_roundtrip(opdef, case, "reference", "cpu", assume))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_nan_rows(op, backend, device):
    opdef = OPS[op]
    run_property(f"nan_rows.{op}", backend, device, 24, opdef.draw(backend, device),
                 lambda case, data: check_nan_rows(opdef, case, backend, device, data))


@pytest.mark.parametrize("op", REFERENCE_OPS)
def test_nan_rows_reference_ops(op):
    opdef = OPS[op]
    run_property(f"nan_rows.{op}", "reference", "cpu", 16, opdef.draw("reference", "cpu"),
                 lambda case, data: check_nan_rows(opdef, case, "reference", "cpu", data))


# ------------------------------------------------------------------------------------------------
# Offsets past 2^31 elements, on views: rows 2^31 elements apart in one storage that is reserved
# but never written (the OS maps its pages lazily: only the few the rows use are touched). The
# merge op hands such row-strided views to its kernels as they are (row pointer = base + r * row
# stride: 32-bit arithmetic would wrap to a negative offset and read or write out of bounds);
# the other ops make their inputs contiguous first, which must copy the right elements.

HUGE_STRIDE = 2 ** 31 + 16  # elements between rows: past INT32_MAX already at row 1


def huge_rows(rows: int, width: int, dtype=torch.float32):
    """A function giving (rows, width) views at column offsets of one storage whose rows lie
    HUGE_STRIDE elements apart, or a skip when the address space cannot be reserved."""
    try:
        storage = torch.empty(HUGE_STRIDE * (rows - 1) + 16 * width + 64, dtype=dtype)
    except RuntimeError as e:  # no overcommit / 32-bit address space
        pytest.skip(f"cannot reserve {HUGE_STRIDE * rows * 4 / 2 ** 30:.0f} GiB of address space: {e}")
    slots = iter(range(0, 16 * width, width + 8))

    def view(values: torch.Tensor) -> torch.Tensor:
        off = next(slots)
        v = storage.as_strided(values.shape, (HUGE_STRIDE,) + tuple(values[0].stride()), off)
        v.copy_(values)
        return v

    return view


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if not interpreted(*p.values)])
def test_offsets_past_2_31_on_views(backend, device):
    if device != "cpu":
        pytest.skip("the views are CPU storage")
    rows, c, k = 3, 5, 3
    g = torch.Generator().manual_seed(0)
    kept, x, params = (torch.randn(rows, n, generator=g) for n in (k, c, 2 * c))
    view = huge_rows(rows, 2 * c)
    kept_v, x_v, params_v = view(kept), view(x), view(params)
    assert kept_v.stride(0) == HUGE_STRIDE and x_v.storage_offset() + HUGE_STRIDE * (rows - 1) > 2 ** 32
    leaves = [t.detach().requires_grad_() for t in (kept_v, x_v, params_v)]
    with flowkern.backend(backend):
        out, ld = ops.affine_coupling_merge(*leaves, scale="sigmoid", kept_first=False)
        (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().add(ld.sum()).backward()
    ref_leaves = [t.detach().clone().requires_grad_() for t in (kept, x, params)]
    ref_out, ref_ld = affine_coupling_merge_ref(*ref_leaves, scale="sigmoid", kept_first=False)
    (ref_out * torch.arange(ref_out.numel()).reshape(ref_out.shape).sin()).sum().add(ref_ld.sum()).backward()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(ld, ref_ld)
    for leaf, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad, ref.grad)
    # The inputs are untouched, and nothing was written between the rows.
    assert torch.equal(x_v, x) and torch.equal(params_v, params)

    # The ops that copy their inputs contiguous first, on the same kind of views.
    with flowkern.backend(backend):
        y, ld = ops.affine_coupling(view(x), view(x * 0.5), view(-x), scale="tanh")
        y_ref, ld_ref = R.affine_coupling_ref(x, x * 0.5, -x, scale="tanh")
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(ld, ld_ref)
        z = view(x)
        torch.testing.assert_close(ops.gaussian_nll(z), R.gaussian_nll_ref(x))
        y, ld = ops.dequantize_logit_inverse(z)
        torch.testing.assert_close(y, R.dequantize_logit_inverse_ref(x)[0])
