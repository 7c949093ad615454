"""Argument validation audit: every public op checks shapes, dtypes, devices and value ranges up
front and raises ValueError / TypeError naming the argument (docs/ops.md lists what each accepts).

Each op has one valid call; each case changes one argument and expects the error type and the
argument's name in the message. Device mismatches use the "meta" device, so they run without a
GPU. The checks run before any backend is chosen: the cases run on the reference and the
compiled backend (where built) alike.
"""
from __future__ import annotations

import math

import pytest
import torch

import flowkern
from flowkern import ops

B, D = 3, 4


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device) if shape else torch.randn((), dtype=dtype, device=device)


def pixels(*shape, dtype=torch.uint8):
    return torch.randint(0, 256, shape).to(dtype)


# op name -> (function, positional args, keyword args) of one valid call
VALID = {
    "affine_coupling": (ops.affine_coupling, lambda: [t(B, D), t(B, D), t(B, D)], dict(scale="exp", clamp=2.0)),
    "affine_coupling_merge": (ops.affine_coupling_merge, lambda: [t(B, 2), t(B, D), t(B, 2 * D)], {}),
    "additive_coupling": (ops.additive_coupling, lambda: [t(B, D), t(B, D)], {}),
    "rq_spline": (ops.rq_spline, lambda: [t(B, D), t(B, D, 3 * 8 - 1)], dict(bins=8, bound=3.0)),
    "actnorm": (ops.actnorm, lambda: [t(B, D, 2), t(D), t(D)], {}),
    "batchnorm_flow": (ops.batchnorm_flow, lambda: [t(B, D), t(D), t(D).abs(), t(D), t(D)], dict(eps=1e-5)),
    "batchnorm_flow_train": (ops.batchnorm_flow_train, lambda: [t(B, D), t(D), t(D)], dict(eps=1e-5)),
    "batch_stats": (ops.batch_stats, lambda: [t(B, D)], {}),
    "gaussian_nll": (ops.gaussian_nll, lambda: [t(B, D), t(B)], {}),
    "dequantize_logit": (ops.dequantize_logit, lambda: [pixels(B, D)], dict(alpha=1e-6, seed=3)),
    "dequantize_logit_inverse": (ops.dequantize_logit_inverse, lambda: [t(B, D)], dict(alpha=1e-6)),
    "dequantize": (ops.dequantize, lambda: [pixels(B, D), torch.rand(B, D)], {}),
    "quantize": (ops.quantize, lambda: [torch.rand(B, D)], {}),
    "logit": (ops.logit, lambda: [torch.rand(B, D)], dict(alpha=1e-6)),
}

# Ops with a running `logdet` keyword, and the dtype that log-det has for float32 input.
WITH_LOGDET = ["affine_coupling", "affine_coupling_merge", "additive_coupling", "rq_spline", "actnorm",
               "batchnorm_flow", "batchnorm_flow_train", "dequantize_logit", "dequantize_logit_inverse",
               "dequantize", "quantize", "logit"]


def positional(i, value):
    def change(args, kw):
        args[i] = value(args) if callable(value) else value
    return change


def keyword(name, value):
    def change(args, kw):
        kw[name] = value(args) if callable(value) else value
    return change


def meta(args_index):
    return positional(args_index, lambda args: args[args_index].to("meta"))


# (op, what is wrong, change, error type, the argument the message must name)
CASES = [
    # affine_coupling
    ("affine_coupling", "x not a tensor", positional(0, [[1.0]]), TypeError, "x"),
    ("affine_coupling", "x integer", positional(0, torch.ones(B, D, dtype=torch.int64)), TypeError, "x"),
    ("affine_coupling", "x complex", positional(0, torch.ones(B, D, dtype=torch.complex64)), TypeError, "x"),
    ("affine_coupling", "x 0-d", positional(0, t()), ValueError, "x"),
    ("affine_coupling", "shift shape", positional(1, t(B, D + 1)), ValueError, "shift"),
    ("affine_coupling", "shift dtype", positional(1, t(B, D, dtype=torch.float64)), TypeError, "shift"),
    ("affine_coupling", "shift device", meta(1), ValueError, "shift"),
    ("affine_coupling", "scale_raw shape", positional(2, t(B + 1, D)), ValueError, "scale_raw"),
    ("affine_coupling", "scale_raw device", meta(2), ValueError, "scale_raw"),
    ("affine_coupling", "scale name", keyword("scale", "softsign"), ValueError, "scale"),
    ("affine_coupling", "clamp 0", keyword("clamp", 0.0), ValueError, "clamp"),
    ("affine_coupling", "clamp nan", keyword("clamp", math.nan), ValueError, "clamp"),
    ("affine_coupling", "clamp inf", keyword("clamp", math.inf), ValueError, "clamp"),
    ("affine_coupling", "clamp string", keyword("clamp", "2"), TypeError, "clamp"),
    ("affine_coupling", "clamp None", keyword("clamp", None), TypeError, "clamp"),
    ("affine_coupling", "inverse string", keyword("inverse", "no"), TypeError, "inverse"),
    ("affine_coupling", "inverse None", keyword("inverse", None), TypeError, "inverse"),
    # affine_coupling_merge
    ("affine_coupling_merge", "x 1-D", positional(1, t(B)), ValueError, "kept"),
    ("affine_coupling_merge", "kept rows", positional(0, t(B + 1, 2)), ValueError, "kept"),
    ("affine_coupling_merge", "kept dtype", positional(0, t(B, 2, dtype=torch.float64)), TypeError, "kept"),
    ("affine_coupling_merge", "kept device", meta(0), ValueError, "kept"),
    ("affine_coupling_merge", "params width", positional(2, t(B, D)), ValueError, "params"),
    ("affine_coupling_merge", "params dtype", positional(2, t(B, 2 * D, dtype=torch.float16)), TypeError, "params"),
    ("affine_coupling_merge", "params device", meta(2), ValueError, "params"),
    ("affine_coupling_merge", "kept_first string", keyword("kept_first", "yes"), TypeError, "kept_first"),
    ("affine_coupling_merge", "clamp negative", keyword("clamp", -1.0), ValueError, "clamp"),
    # additive_coupling
    ("additive_coupling", "shift shape", positional(1, t(B, D, 1)), ValueError, "shift"),
    ("additive_coupling", "shift device", meta(1), ValueError, "shift"),
    ("additive_coupling", "inverse 2", keyword("inverse", 2), TypeError, "inverse"),
    # rq_spline
    ("rq_spline", "params shape for bins", positional(1, t(B, D, 3 * 4 - 1)), ValueError, "params"),
    ("rq_spline", "params dtype", positional(1, t(B, D, 23, dtype=torch.float64)), TypeError, "params"),
    ("rq_spline", "params device", meta(1), ValueError, "params"),
    ("rq_spline", "params integer", positional(1, torch.ones(B, D, 23, dtype=torch.int32)), TypeError, "params"),
    ("rq_spline", "bins 0", keyword("bins", 0), ValueError, "bins"),
    ("rq_spline", "bins float", keyword("bins", 8.0), TypeError, "bins"),
    ("rq_spline", "bins bool", keyword("bins", True), TypeError, "bins"),
    ("rq_spline", "bins > 1000", keyword("bins", 1001), ValueError, "bins"),
    ("rq_spline", "bound 0", keyword("bound", 0.0), ValueError, "bound"),
    ("rq_spline", "bound inf", keyword("bound", math.inf), ValueError, "bound"),
    ("rq_spline", "bound nan", keyword("bound", math.nan), ValueError, "bound"),
    ("rq_spline", "bound 1e31", keyword("bound", 1e31), ValueError, "bound"),
    ("rq_spline", "bound string", keyword("bound", "3"), TypeError, "bound"),
    ("rq_spline", "bound reversed pair", keyword("bound", (1.0, 0.0)), ValueError, "bound"),
    ("rq_spline", "bound triple", keyword("bound", (0.0, 1.0, 2.0)), ValueError, "bound"),
    ("rq_spline", "bound pair inf", keyword("bound", (0.0, math.inf)), ValueError, "bound"),
    ("rq_spline", "bound pair string", keyword("bound", (0.0, "1")), TypeError, "bound"),
    ("rq_spline", "tails circular", keyword("tails", "circular"), ValueError, "tails"),
    ("rq_spline", "tails None params", keyword("tails", None), ValueError, "params"),
    ("rq_spline", "inverse string", keyword("inverse", "False"), TypeError, "inverse"),
    # actnorm
    ("actnorm", "x 1-D", positional(0, t(B)), ValueError, "x"),
    ("actnorm", "shift length", positional(1, t(D + 1)), ValueError, "shift"),
    ("actnorm", "log_scale 2-D", positional(2, t(1, D)), ValueError, "log_scale"),
    ("actnorm", "log_scale dtype", positional(2, t(D, dtype=torch.float64)), TypeError, "log_scale"),
    ("actnorm", "shift device", meta(1), ValueError, "shift"),
    ("actnorm", "shift list", positional(1, [0.0] * D), TypeError, "shift"),
    # batchnorm_flow
    ("batchnorm_flow", "mean length", positional(1, t(D - 1)), ValueError, "mean"),
    ("batchnorm_flow", "var dtype", positional(2, t(D, dtype=torch.float16)), TypeError, "var"),
    ("batchnorm_flow", "log_gamma device", meta(3), ValueError, "log_gamma"),
    ("batchnorm_flow", "beta integer", positional(4, torch.ones(D, dtype=torch.int64)), TypeError, "beta"),
    ("batchnorm_flow", "eps 0", keyword("eps", 0.0), ValueError, "eps"),
    ("batchnorm_flow", "eps -1", keyword("eps", -1.0), ValueError, "eps"),
    ("batchnorm_flow", "eps string", keyword("eps", "1e-5"), TypeError, "eps"),
    ("batchnorm_flow", "inverse string", keyword("inverse", "true"), TypeError, "inverse"),
    # batchnorm_flow_train, batch_stats
    ("batchnorm_flow_train", "no rows", positional(0, t(0, D)), ValueError, "x"),
    ("batchnorm_flow_train", "no spatial values", positional(0, t(B, D, 0)), ValueError, "x"),
    ("batchnorm_flow_train", "log_gamma length", positional(1, t(D + 2)), ValueError, "log_gamma"),
    ("batchnorm_flow_train", "beta device", meta(2), ValueError, "beta"),
    ("batchnorm_flow_train", "eps nan", keyword("eps", math.nan), ValueError, "eps"),
    ("batch_stats", "x 1-D", positional(0, t(B)), ValueError, "x"),
    ("batch_stats", "no rows", positional(0, t(0, D)), ValueError, "x"),
    ("batch_stats", "x integer", positional(0, torch.ones(B, D, dtype=torch.int64)), TypeError, "x"),
    # gaussian_nll
    ("gaussian_nll", "z integer", positional(0, torch.ones(B, D, dtype=torch.int64)), TypeError, "z"),
    ("gaussian_nll", "z 0-d", positional(0, t()), ValueError, "z"),
    ("gaussian_nll", "logdet shape", positional(1, t(B, 1)), ValueError, "logdet"),
    ("gaussian_nll", "bits_per_dim with no values", lambda a, k: (a.__setitem__(0, t(B, 0)),
                                                                 k.__setitem__("bits_per_dim", True)),
     ValueError, "bits_per_dim"),
    ("gaussian_nll", "bits_per_dim string", keyword("bits_per_dim", "yes"), TypeError, "bits_per_dim"),
    # dequantize_logit
    ("dequantize_logit", "x float", positional(0, torch.rand(B, D)), TypeError, "x_uint8"),
    ("dequantize_logit", "x bool", positional(0, torch.ones(B, D, dtype=torch.bool)), TypeError, "x_uint8"),
    ("dequantize_logit", "x 0-d", positional(0, torch.tensor(3, dtype=torch.uint8)), ValueError, "x_uint8"),
    ("dequantize_logit", "x int32 out of range", positional(0, torch.full((B, D), 256, dtype=torch.int32)),
     ValueError, "x_uint8"),
    ("dequantize_logit", "x int64 negative", positional(0, torch.full((B, D), -1, dtype=torch.int64)),
     ValueError, "x_uint8"),
    ("dequantize_logit", "noise shape", lambda a, k: (a.append(torch.rand(B, D + 1)), k.pop("seed")), ValueError,
     "noise"),
    ("dequantize_logit", "noise integer", lambda a, k: (a.append(torch.zeros(B, D, dtype=torch.int64)), k.pop("seed")),
     TypeError, "noise"),
    ("dequantize_logit", "noise 1.0", lambda a, k: (a.append(torch.ones(B, D)), k.pop("seed")), ValueError, "noise"),
    ("dequantize_logit", "noise negative", lambda a, k: (a.append(-torch.rand(B, D) - 0.1), k.pop("seed")),
     ValueError, "noise"),
    ("dequantize_logit", "noise nan", lambda a, k: (a.append(torch.full((B, D), math.nan)), k.pop("seed")),
     ValueError, "noise"),
    ("dequantize_logit", "noise device", lambda a, k: (a.append(torch.rand(B, D, device="meta")), k.pop("seed")),
     ValueError, "noise"),
    ("dequantize_logit", "noise and seed", lambda a, k: a.append(torch.rand(B, D)), ValueError, "seed"),
    ("dequantize_logit", "alpha 0.5", keyword("alpha", 0.5), ValueError, "alpha"),
    ("dequantize_logit", "alpha negative", keyword("alpha", -1e-6), ValueError, "alpha"),
    ("dequantize_logit", "alpha nan", keyword("alpha", math.nan), ValueError, "alpha"),
    ("dequantize_logit", "alpha string", keyword("alpha", "0.1"), TypeError, "alpha"),
    ("dequantize_logit", "seed float", keyword("seed", 1.5), TypeError, "seed"),
    ("dequantize_logit", "seed 2**64", keyword("seed", 2 ** 64), ValueError, "seed"),
    ("dequantize_logit", "seed below -2**63", keyword("seed", -(2 ** 63) - 1), ValueError, "seed"),
    ("dequantize_logit", "generator type", lambda a, k: (k.pop("seed"), k.__setitem__("generator", 3)), TypeError,
     "generator"),
    ("dequantize_logit", "dtype int", keyword("dtype", torch.int32), TypeError, "dtype"),
    ("dequantize_logit", "dtype string", keyword("dtype", "float32"), TypeError, "dtype"),
    ("dequantize_logit", "logdet dtype vs float64 output", lambda a, k: (k.__setitem__("dtype", torch.float64),
                                                                           k.__setitem__("logdet", t(B + 1))),
     ValueError, "logdet"),
    # dequantize_logit_inverse, dequantize, quantize, logit
    ("dequantize_logit_inverse", "y integer", positional(0, torch.ones(B, D, dtype=torch.int64)), TypeError, "y"),
    ("dequantize_logit_inverse", "alpha 1", keyword("alpha", 1.0), ValueError, "alpha"),
    ("dequantize", "x float", positional(0, torch.rand(B, D)), TypeError, "x_uint8"),
    ("dequantize", "noise shape", positional(1, torch.rand(B, D, 1)), ValueError, "noise"),
    ("dequantize", "noise 1.5", positional(1, torch.full((B, D), 1.5)), ValueError, "noise"),
    ("dequantize", "generator device", lambda a, k: (a.pop(), a.__setitem__(0, a[0].to("meta")),
                                                     k.__setitem__("generator", torch.Generator())),
     ValueError, "generator"),
    ("dequantize", "dtype", keyword("dtype", torch.int64), TypeError, "dtype"),
    ("quantize", "v integer", positional(0, torch.ones(B, D, dtype=torch.int64)), TypeError, "v"),
    ("quantize", "logdet rows", keyword("logdet", t(B + 1)), ValueError, "logdet"),
    ("logit", "v integer", positional(0, torch.ones(B, D, dtype=torch.int64)), TypeError, "v"),
    ("logit", "alpha -0.1", keyword("alpha", -0.1), ValueError, "alpha"),
    ("logit", "alpha bool", keyword("alpha", True), TypeError, "alpha"),
    ("logit", "inverse string", keyword("inverse", "yes"), TypeError, "inverse"),
]
# Every op with a running log-det checks it the same way.
for _op in WITH_LOGDET:
    CASES += [
        (_op, "logdet not a tensor", keyword("logdet", [0.0] * B), TypeError, "logdet"),
        (_op, "logdet integer", keyword("logdet", torch.zeros(B, dtype=torch.int64)), TypeError, "logdet"),
        (_op, "logdet shape", keyword("logdet", t(B, 1)), ValueError, "logdet"),
        (_op, "logdet rows", keyword("logdet", t(B + 1)), ValueError, "logdet"),
        (_op, "logdet device", keyword("logdet", t(B, device="meta")), ValueError, "logdet"),
    ]


def backends():
    return [b for b in ("reference", "cpu") if b in flowkern.available_backends()]


@pytest.mark.parametrize("op", sorted(VALID))
@pytest.mark.parametrize("backend", backends())
def test_valid_call_runs(op, backend):
    fn, args, kw = VALID[op]
    with flowkern.backend(backend):
        fn(*args(), **kw)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("op,what,change,error,name", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_argument_raises_naming_it(op, what, change, error, name, backend):
    fn, make_args, kw = VALID[op]
    args, kw = make_args(), dict(kw)
    change(args, kw)
    with flowkern.backend(backend):
        with pytest.raises(error) as info:
            fn(*args, **kw)
    assert name in str(info.value), f"{op}, {what}: the message does not name {name!r}: {info.value}"


def test_every_public_op_is_audited():
    """A new public op must get a valid call and cases here (and a row in docs/ops.md)."""
    assert set(ops.__all__) == set(VALID), set(ops.__all__) ^ set(VALID)
    audited = {c[0] for c in CASES}
    assert audited == set(VALID), set(VALID) - audited


def test_docs_table_lists_every_op():
    import pathlib
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "ops.md").read_text()
    for op in ops.__all__:
        assert f"`{op}(" in doc, f"docs/ops.md has no row for {op}"


def test_flags_accept_bools_and_0_1():
    x = t(B, D)
    for value in (True, False, 0, 1):
        ops.affine_coupling(x, x, x, inverse=value)
    out_true, _ = ops.affine_coupling(x, x, x, inverse=1)
    out_ref, _ = ops.affine_coupling(x, x, x, inverse=True)
    assert torch.equal(out_true, out_ref)


def test_backend_switch_validates():
    with pytest.raises(ValueError, match="backend"):
        flowkern.set_backend("tpu")
    with pytest.raises(TypeError, match="backend"):
        flowkern.set_backend(3)
    with pytest.raises(ValueError, match="backend"):
        with flowkern.backend("fastest"):
            pass
    if "cuda" not in flowkern.available_backends():
        # Not there: a RuntimeError subclass that says why, never a silent fallback.
        with pytest.raises(flowkern.BackendUnavailable, match="cuda"):
            flowkern.set_backend("cuda")


def test_explicit_backend_refuses_what_its_kernels_cannot_take():
    x = t(B, D)
    if "cpu" in flowkern.available_backends():
        with flowkern.backend("cpu"):
            with pytest.raises(ValueError, match="bins"):
                ops.rq_spline(x, t(B, D, 3 * 65 - 1), bins=65)
            with pytest.raises(flowkern.BackendUnavailable, match="cpu"):
                ops.affine_coupling(*(t(B, D, device="meta") for _ in range(3)))
    with flowkern.backend("auto"):  # auto takes the reference beyond the kernels' 64 bins
        out, _ = ops.rq_spline(x, t(B, D, 3 * 65 - 1), bins=65)
        assert torch.isfinite(out).all()


def test_empty_and_zero_width_inputs_are_accepted():
    for backend in backends():
        with flowkern.backend(backend):
            for shape in ((0, D), (B, 0), (0,)):
                x = t(*shape)
                out, ld = ops.affine_coupling(x, x, x)
                assert out.shape == shape and ld.shape == (shape[0],)
                out, ld = ops.rq_spline(x, t(*shape, 23))
                assert out.shape == shape and ld.shape == (shape[0],)
                assert ops.gaussian_nll(x).shape == (shape[0],)
            out, ld = ops.actnorm(t(0, D, 2), t(D), t(D))
            assert out.shape == (0, D, 2) and ld.shape == (0,)
            out, ld = ops.dequantize_logit(pixels(B, 0), seed=1)
            assert out.shape == (B, 0) and torch.equal(ld, torch.zeros(B))
