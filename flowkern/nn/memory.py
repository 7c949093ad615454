"""Memory-saving backprop through a flow: no activations kept, inputs rebuilt by exact inverses.

Standard backprop keeps every layer's activations (conditioner hidden layers, coupling inputs,
...) from the forward pass until the backward pass, so activation memory grows with depth.
A flow's layers are invertible, so their inputs need not be kept at all (as in Gomez et al.
2017, "The Reversible Residual Network"):

  forward   runs the layers under torch.no_grad() and keeps only the output z (plus the inputs
            of the few layers that cannot be inverted exactly, below);
  backward  walks the layers in reverse: x = layer.inverse(y) (no grad), then recomputes
            y, logdet = layer(x) with grad on and backpropagates through that one layer,
            giving the gradient w.r.t. x (the previous layer's output), the layer's parameters
            and the context. Memory: one layer's activations at a time, whatever the depth.

Log-dets add, so each layer is recomputed with logdet=None and the gradient of the returned
log-det goes to every layer's own log-det.

Couplings do better than inverse-then-recompute: their conditioner sees the kept part (and the
context), which is the same in y and x, so it runs once, with grad, inside the inverse, and the
recompute reuses its output (grafted onto the recompute's own input, so gradients reach x and
the context). With F a forward and B a backward (B ~ 2F), standard backprop costs F + B and
memory-saving about 2F + B: ~1.33x where the conditioners dominate. Block-mask affine
couplings do better still: AffineCoupling.fused_backward_from_output rebuilds x and computes the
transform's gradients in one kernel pass (1.30x measured at depth 32, hidden 128, on a 2-core
CPU; 1.5x before that fused step; benchmarks/memory_saving.py).

Layers kept as ordinary checkpoints (their input is stored in the forward pass and the layer
is recomputed from it, not reconstructed): BatchNormFlow in training mode (its forward uses
the batch statistics, its inverse the running ones), ActNorm before its data-dependent
initialisation (the first training forward; in eval mode its inverse refuses to run),
LinearLU and Invertible1x1Conv under autocast (their matmul then rounds the input to half
precision), layers whose input is not floating point, layers without an `inverse`, and any
layer with an attribute `exact_inverse = False`. Their buffers (BatchNormFlow's running
statistics) are put back after the recompute, so a step updates them once, as standard
backprop does. Dequantize layers (VariationalDequantize included, and any layer with
`stochastic = True`) draw noise: their input and the RNG state are stored, and the recompute,
needed only for their parameters or a float input, replays the same noise. Split and nested
MemorySaving are walked into, so a multi-scale flow (Glow) keeps no activations at any level.

The parameters are inputs of one autograd.Function, which returns their gradients: they
accumulate into .grad as usual (optimizers, gradient clipping, DDP's gradient hooks; hooks
registered on them fire once). During the backward walk the modules hold detached aliases of
their parameters, so the inner recomputes do not fire those hooks a second time; parameters
used by several layers (the same layer twice) get the sum. The recompute runs in the autocast
state of the forward pass (captured at forward, re-entered in backward).

Drift: the rebuilt inputs carry rounding error that grows over the walk, by each inverse's
condition: ~4e-7 (affine) to ~2e-6 (spline) relative at depth 32 in float32 for moderate
weights, but steep splines amplify it 10-1000x per layer (tests/test_memory_saving.py).
keep_every=k (Flow(..., memory_saving=k)) keeps every k-th layer's input, so the walk restarts
from exact values there: memory (depth / k) inputs.

Parameters and buffers must not change between the forward and the backward pass (as for
torch.utils.checkpoint). Double backward is not supported; under torch.compile the plain
layers are traced instead (standard backprop). Flow.inverse (sampling) is not affected.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops import _checks
from ..ops._autograd import first_order_backward
from .flow import FlowLayer

# How a layer is handled (decided in the forward pass, per call):
INVERT = "invert"          # keep nothing; rebuild the input with layer.inverse
CHECKPOINT = "checkpoint"  # keep the input; recompute from it
NOISE = "noise"            # keep the input and the RNG state; recompute (if needed) with the same noise
SPLIT = "split"            # Split: recurse into its inner layers
SEQUENCE = "sequence"      # a nested MemorySaving: recurse into its layers


def _layer_mode(layer: nn.Module, x: torch.Tensor) -> str:
    """How `layer` is handled when called on x now (in its current training/eval mode)."""
    from .linear import _LULayer
    from .norm import ActNorm, BatchNormFlow
    from .preprocess import Dequantize

    if isinstance(layer, Dequantize) or getattr(layer, "stochastic", False):
        return NOISE
    if not x.is_floating_point() or not callable(getattr(layer, "inverse", None)):
        return CHECKPOINT
    if isinstance(layer, BatchNormFlow) and layer.training:
        return CHECKPOINT
    if isinstance(layer, ActNorm) and not layer._is_initialized():
        return CHECKPOINT
    if isinstance(layer, _LULayer) and torch.is_autocast_enabled(x.device.type):
        return CHECKPOINT  # autocast runs its matmul in half precision: the input is rounded away
    exact = getattr(layer, "exact_inverse", True)
    if callable(exact):
        exact = exact()
    return INVERT if exact else CHECKPOINT


def _is_split(layer: nn.Module) -> bool:
    from .reshape import Split

    # Only Split itself: a subclass may redefine what forward does with its halves.
    return type(layer) is Split


def _split_halves(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split's partition of dim 1: the first ceil(C/2) channels are transformed."""
    kept = x.shape[1] - x.shape[1] // 2
    return x[:, :kept], x[:, kept:]


class _Record:
    """What the forward pass leaves for the backward walk: per layer (mode, layer, detail)."""

    __slots__ = ("plan", "saved", "rng", "keep_every", "count")

    def __init__(self, keep_every: Optional[int] = None):
        self.keep_every, self.count = keep_every, 0  # count: leaf layers walked so far
        self.plan: list = []
        self.saved: List[torch.Tensor] = []  # inputs of checkpointed / noise layers (until ctx saves them)
        self.rng: list = []                  # RNG states of noise layers


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay_rng(state, device: torch.device):
    cpu, cuda = state
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def _forward_walk(layers: Iterable[nn.Module], x, context, logdet, record: _Record, plan: list):
    """Runs the layers (the caller holds no_grad), noting in `plan` how each is to be undone."""
    for layer in layers:
        if isinstance(layer, MemorySaving):
            inner = []
            x, logdet = _forward_walk(layer.layers, x, context, logdet, record, inner)
            plan.append((SEQUENCE, layer, inner))
            continue
        if _is_split(layer):
            _checks.tensor("x", x, min_dim=2)
            if x.shape[1] < 2:
                raise ValueError(f"Split: x must have shape (batch, C, ...) with C >= 2, got {tuple(x.shape)}")
            logdet = _checks.running_logdet(logdet, x)
            kept, out = _split_halves(x)
            inner: list = []
            h, logdet = _forward_walk(layer.layers, kept, context, logdet, record, inner)
            layer._check_kept(h, kept, "forward")
            plan.append((SPLIT, layer, inner))
            x = torch.cat([h, out], dim=1)
            continue
        mode = _layer_mode(layer, x)
        if mode == INVERT and record.keep_every and record.count and record.count % record.keep_every == 0:
            mode = CHECKPOINT  # an anchor: the walk restarts from the exact input here
        record.count += 1
        if mode == INVERT:
            plan.append((INVERT, layer, None))
        else:
            record.saved.append(x)
            detail = len(record.saved) - 1
            if mode == NOISE:
                record.rng.append(_rng_state(x.device))
                detail = (detail, len(record.rng) - 1)
            plan.append((mode, layer, detail))
        x, logdet = layer(x, context, logdet)
    return x, logdet


@contextlib.contextmanager
def _aliased_parameters(modules: Sequence[nn.Module], params: Sequence[torch.Tensor]):
    """Within the block the modules hold detached aliases (same storage) of `params` instead of
    the parameters themselves, so the recompute's autograd.grad sees the aliases and hooks
    registered on the real parameters fire only once, when the Function hands their gradients
    back. Yields {id(param): alias}."""
    aliases = {id(p): nn.Parameter(p.detach(), requires_grad=True) for p in params}
    swapped = []
    try:
        seen = set()
        for root in modules:
            for m in root.modules():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                for name, p in m._parameters.items():
                    if p is not None and id(p) in aliases:
                        swapped.append((m, name, p))
                        m._parameters[name] = aliases[id(p)]
        yield aliases
    finally:
        for m, name, p in reversed(swapped):
            m._parameters[name] = p


class _Backward:
    """The backward walk: state shared while going through the layers in reverse."""

    def __init__(self, record: _Record, saved: Sequence[torch.Tensor], context, context_grad: bool,
                 autocast: Tuple[str, bool, torch.dtype], aliases: dict, grad_logdet: Optional[torch.Tensor]):
        self.record, self.saved, self.autocast = record, saved, autocast
        self.alias_ids = {id(a) for a in aliases.values()}
        self.grad_logdet = grad_logdet
        self.context = None if context is None else context.detach().requires_grad_(context_grad)
        self.context_grad = None
        self.param_grads: dict = {}

    def _autocast(self):
        device_type, enabled, dtype = self.autocast
        return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False)

    def walk(self, plan: list, y: torch.Tensor, grad_y: Optional[torch.Tensor], need_input_grad: bool):
        """(x, grad_x) at the input of the layers in `plan`, from their output y and its gradient."""
        for i in range(len(plan) - 1, -1, -1):
            mode, layer, detail = plan[i]
            need_x = need_input_grad or i > 0
            if mode == SEQUENCE:
                y, grad_y = self.walk(detail, y, grad_y, need_x)
                continue
            if mode == SPLIT:
                kept_y, out_y = _split_halves(y)
                grad_kept = grad_out = None
                if grad_y is not None:
                    grad_kept, grad_out = _split_halves(grad_y)
                kept_x, grad_kept = self.walk(detail, kept_y, grad_kept, need_x)
                y = torch.cat([kept_x, out_y], dim=1)
                if need_x and (grad_kept is not None or grad_out is not None):
                    grad_kept = torch.zeros_like(kept_x) if grad_kept is None else grad_kept
                    grad_out = torch.zeros_like(out_y) if grad_out is None else grad_out
                    grad_y = torch.cat([grad_kept, grad_out], dim=1)
                else:
                    grad_y = None
                continue
            rng = None
            if mode == INVERT:
                # The forward pass updated any batch statistics inside the layer (a BatchNorm in
                # a conditioner) once; the inverse and the recompute must not do it again.
                with _statistics_kept(layer):
                    y, grad_y = self._invert_step(layer, y, grad_y, need_x)
                continue
            if mode == NOISE:
                x = self.saved[detail[0]]
                rng = self.record.rng[detail[1]]
            else:
                x = self.saved[detail]
            grad_y = self._recompute(layer, mode, x, grad_y, need_x and x.is_floating_point(), rng)
            y = x
        return y, grad_y

    def _invert_step(self, layer, y, grad_y, need_x: bool):
        """An INVERT layer's step: the input rebuilt by its inverse, then the recompute (for the
        couplings, the fused step or the step sharing one conditioner pass)."""
        if _has_conditioner(layer) and _builtin(layer) and not self.autocast[1]:
            step = self._fused_coupling_step(layer, y, grad_y, need_x)
            if step is not None:
                return step
        if _has_conditioner(layer):
            return self._coupling_step(layer, y, grad_y, need_x)
        with torch.no_grad(), self._autocast():
            x, _ = layer.inverse(y, self.context, None)
        return x, self._recompute(layer, INVERT, x, grad_y, need_x and x.is_floating_point(), None)

    def _needs(self, layer, grad_y, need_x: bool):
        """(params, need_ctx, anything to compute)."""
        # Inside _aliased_parameters the layer's parameters are the aliases.
        params = [p for p in _unique_parameters([layer]) if id(p) in self.alias_ids]
        need_ctx = self.context is not None and self.context.requires_grad
        work = (need_x or bool(params) or need_ctx) and (grad_y is not None or self.grad_logdet is not None)
        return params, need_ctx, work

    def _fused_coupling_step(self, layer, y, grad_y, need_x: bool):
        """The coupling's fused backward from its output (the layer's fused_backward_from_output:
        one conditioner pass and one kernel pass that rebuilds x and the transform's gradients),
        or None where the layer has none."""
        need_x = need_x and y.is_floating_point()
        params, need_ctx, work = self._needs(layer, grad_y, need_x)
        if not work:
            return None
        wrt = ([self.context] if need_ctx else []) + params
        result = layer.fused_backward_from_output(y, grad_y, self.grad_logdet, self.context, wrt, need_x)
        if result is None:
            return None
        x, grad_x, got = result
        self._accumulate(got, need_ctx, params)
        return x, grad_x

    def _accumulate(self, got: Sequence[Optional[torch.Tensor]], need_ctx: bool, params) -> None:
        """Adds gradients (the context's first when need_ctx, then one per param) into self."""
        if need_ctx:
            g, got = got[0], got[1:]
            if g is not None:
                self.context_grad = g if self.context_grad is None else self.context_grad + g
        for p, g in zip(params, got):
            if g is not None:
                prev = self.param_grads.get(id(p))
                self.param_grads[id(p)] = g if prev is None else prev + g

    def _coupling_step(self, layer, y, grad_y, need_x: bool):
        """A coupling's inverse and recompute sharing one conditioner pass. The conditioner's
        input h (the kept part, and the context) is the same in y and in x, so it runs once,
        with grad, inside the inverse (the rest of the inverse without grad), and the recompute
        reuses its output P; the gradient reaching h through P is then carried to x and the
        context through the recompute's own h. Saves a third of the walk's conditioner work.
        Falls back to _recompute where the reuse does not apply."""
        need_x = need_x and y.is_floating_point()
        params, need_ctx, work = self._needs(layer, grad_y, need_x)
        if not work:
            with torch.no_grad(), self._autocast():
                return layer.inverse(y, self.context, None)[0], None
        conditioner = layer.conditioner
        capture = _Capture(conditioner, need_x or need_ctx)
        layer._modules["conditioner"] = capture
        try:
            with torch.no_grad(), self._autocast():
                x, _ = layer.inverse(y, self.context, None)
        finally:
            layer._modules["conditioner"] = conditioner
        if capture.calls != 1:
            return x, self._recompute(layer, INVERT, x, grad_y, need_x, None)
        replay = _Replay(conditioner, capture.h, capture.out, verify=not _builtin(layer))
        x_in = x.detach().requires_grad_(need_x)
        layer._modules["conditioner"] = replay
        try:
            with torch.enable_grad(), self._autocast():
                y2, ld = layer(x_in, self.context, None)
        finally:
            layer._modules["conditioner"] = conditioner
        return x, self._backprop(x, x_in, y2, ld, grad_y, need_x, need_ctx, params)

    def _recompute(self, layer, mode, x, grad_y, need_x: bool, rng):
        """Runs layer(x) with grad on and backpropagates grad_y (and the log-det's gradient)
        through it; returns the gradient w.r.t. x (None when not needed)."""
        params, need_ctx, work = self._needs(layer, grad_y, need_x)
        if not work:
            return None
        if mode == NOISE and not (need_x or params):
            return None  # nothing to differentiate: no noise to replay
        x_in = x.detach().requires_grad_(need_x)
        buffers = [(b, b.clone()) for b in layer.buffers()] if mode != INVERT else []
        rng_ctx = _replay_rng(rng, x.device) if rng is not None else contextlib.nullcontext()
        try:
            with torch.enable_grad(), self._autocast(), rng_ctx:
                y, ld = layer(x_in, self.context, None)
            return self._backprop(x, x_in, y, ld, grad_y, need_x, need_ctx, params)
        finally:
            # After the backprop (the recompute's graph may hold these buffers), and only where
            # the recompute changed them (a copy bumps the version counter).
            with torch.no_grad():
                for b, saved in buffers:
                    if not torch.equal(b, saved):
                        b.copy_(saved)

    def _backprop(self, x, x_in, y, ld, grad_y, need_x, need_ctx, params):
        """Gradients of (y, ld) w.r.t. x_in, the context and params, accumulated into self;
        returns the one w.r.t. x."""
        outputs, grads = [], []
        if grad_y is not None and y.requires_grad:
            outputs.append(y)
            grads.append(grad_y)
        if self.grad_logdet is not None and ld.requires_grad:
            outputs.append(ld)
            grads.append(self.grad_logdet.to(ld.dtype))
        inputs = ([x_in] if need_x else []) + ([self.context] if need_ctx else []) + params
        if not outputs or not inputs:
            return torch.zeros_like(x) if need_x else None
        got = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
        grad_x = None
        if need_x:
            grad_x = got[0] if got[0] is not None else torch.zeros_like(x)
            got = got[1:]
        self._accumulate(got, need_ctx, params)
        return grad_x


@contextlib.contextmanager
def _statistics_kept(layer: nn.Module):
    """Puts back the running statistics of every BatchNorm-like module inside layer that is in
    training mode (the only buffers a call changes there), after the block."""
    from torch.nn.modules.batchnorm import _NormBase

    saved = [(b, b.detach().clone()) for m in layer.modules()
             if isinstance(m, _NormBase) and m.training and m.track_running_stats
             for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _builtin(layer: nn.Module) -> bool:
    """flowkern's own couplings build the conditioner's input the same way in both directions
    (tested), so the reuse skips comparing the values (a device sync per layer on a GPU);
    subclasses defined elsewhere get compared."""
    return type(layer).__module__.startswith("flowkern.")


def _has_conditioner(layer: nn.Module) -> bool:
    from .coupling import _Coupling

    return isinstance(layer, _Coupling) and isinstance(getattr(layer, "conditioner", None), nn.Module)


class _Capture(nn.Module):
    """Stands in for a coupling's conditioner during the (no-grad) inverse: runs it with grad on
    leaf copies of its inputs (the kept part, and the context where the layer passes it; leaves
    that require grad when their gradient is wanted), keeps the inputs and the output with its
    graph, and hands the inverse a detached output."""

    def __init__(self, real: nn.Module, input_grad: bool):
        super().__init__()
        object.__setattr__(self, "real", real)  # not a submodule: no parameters of its own
        self.input_grad, self.calls, self.h, self.out = input_grad, 0, None, None

    def forward(self, *args, **kwargs):
        self.calls += 1
        if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
            self.calls += 1  # not the tensors-only call the reuse expects: fall back
            return self.real(*args, **kwargs)
        self.h = tuple(a.detach().requires_grad_(self.input_grad and a.is_floating_point()) for a in args)
        with torch.enable_grad():
            self.out = self.real(*self.h)
        return self.out.detach()


class _Replay(nn.Module):
    """Stands in for a coupling's conditioner during the recompute: when called on the input
    values the inverse saw, returns the output computed there, grafted onto this call's inputs
    (_Graft); else runs the real conditioner."""

    def __init__(self, real: nn.Module, h: tuple, out: torch.Tensor, verify: bool):
        super().__init__()
        object.__setattr__(self, "real", real)
        self.h, self.out, self.used, self.verify = h, out, False, verify

    def _same(self, args) -> bool:
        return (len(args) == len(self.h) and all(
            isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
            and (not self.verify or torch.equal(a, b)) for a, b in zip(args, self.h)))

    def forward(self, *args, **kwargs):
        if not kwargs and not self.used and self._same(args):
            self.used = True
            params = [p for p in self.real.parameters() if p.requires_grad]
            return _Graft.apply(len(args), _Held(self.h, self.out), *args, *params)
        return self.real(*args, **kwargs)


class _Held:
    """Tensors handed to _Graft outside autograd's view (an autograd.Function would otherwise
    connect its output to their graph too)."""

    __slots__ = ("h", "out")

    def __init__(self, h, out):
        self.h, self.out = h, out


class _Graft(torch.autograd.Function):
    """out = conditioner(*h) as already computed from leaf copies of h (held.h, held.out), made a
    function of these inputs and of the conditioner's parameters: the backward runs the
    conditioner's own backward once and hands the gradients to the inputs (so on to x and the
    context) and to the parameters, in the same pass as the rest of the layer."""

    @staticmethod
    def forward(ctx, n, held, *inputs_and_params):
        ctx.set_materialize_grads(False)
        ctx.n, ctx.held = n, held
        ctx.params = inputs_and_params[n:]  # leaves (the aliases): no reference cycle
        return held.out.detach()

    @staticmethod
    @first_order_backward("memory-saving backprop")
    def backward(ctx, grad_out):
        held, params, n = ctx.held, ctx.params, ctx.n
        ctx.held = None
        none = (None,) * (2 + n + len(params))
        if grad_out is None:
            return none
        wants = [h.requires_grad and ctx.needs_input_grad[2 + i] for i, h in enumerate(held.h)]
        inputs = [h for h, w in zip(held.h, wants) if w] + list(params)
        if not inputs:
            return none
        got = list(torch.autograd.grad(held.out, inputs, grad_out, allow_unused=True))
        grads_h = [got.pop(0) if w else None for w in wants]
        return (None, None, *grads_h, *got)


def _unique_parameters(layers: Iterable[nn.Module]) -> List[torch.Tensor]:
    seen, out = set(), []
    for layer in layers:
        for p in layer.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class _MemorySavingFunction(torch.autograd.Function):
    """(z, logdet) of the layers applied in order, keeping only z (and the checkpointed inputs)."""

    @staticmethod
    def forward(ctx, layers, keep_every, x, context, logdet, *params):
        ctx.set_materialize_grads(False)
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        record = _Record(keep_every)
        with torch.no_grad():
            z, logdet_out = _forward_walk(layers, x, context, logdet, record, record.plan)
        if z is x:  # an output must not be the input itself
            z = z.view_as(z)
        ctx.layers, ctx.record = layers, record
        ctx.has_context, ctx.logdet_dtype = context is not None, None if logdet is None else logdet.dtype
        ctx.save_for_backward(z, context, *record.saved)
        record.saved = []  # held by ctx (and the saved-tensor hooks) until the backward
        return z, logdet_out

    @staticmethod
    @first_order_backward("memory-saving backprop")
    def backward(ctx, grad_z, grad_logdet):
        z, context, *saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]  # (x, context, logdet, *params) after (layers, keep_every)
        params = _unique_parameters(ctx.layers)
        trainable = [p for p, need in zip(params, needs[3:]) if need]
        grad_logdet_in = None
        if grad_logdet is not None and needs[2]:
            grad_logdet_in = grad_logdet.to(ctx.logdet_dtype)
        with _aliased_parameters(ctx.layers, trainable) as aliases:
            walker = _Backward(ctx.record, saved, context, bool(needs[1]), ctx.autocast, aliases, grad_logdet)
            _, grad_x = walker.walk(ctx.record.plan, z, grad_z, bool(needs[0]))
            param_grads = [walker.param_grads.get(id(aliases[id(p)])) if id(p) in aliases else None for p in params]
        # Only the returned list may hold the gradients: AccumulateGrad then steals them into
        # .grad instead of copying (a second reference would double the gradients' memory).
        walker.param_grads.clear()
        grad_context = walker.context_grad
        if grad_context is not None:
            grad_context = grad_context.to(context.dtype)
        return (None, None, grad_x if needs[0] else None, grad_context, grad_logdet_in, *param_grads)


def check_keep_every(keep_every) -> Optional[int]:
    if keep_every is None:
        return None
    if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1:
        raise ValueError(f"keep_every must be a positive int or None, got {keep_every!r}")
    return keep_every


def memory_saving_forward(layers: Sequence[nn.Module], x: torch.Tensor, context: Optional[torch.Tensor] = None,
                          logdet: Optional[torch.Tensor] = None, *,
                          keep_every: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(z, logdet) of the flow layers applied in order to x, as
    `for layer in layers: x, logdet = layer(x, context, logdet)`, but keeping no intermediate
    activations for the backward pass: it rebuilds them with the layers' inverses (see the
    module docstring). Without grad mode, or when nothing requires grad, the plain loop.

    keep_every=k also keeps the input of every k-th layer (counting the layers inside Split
    and nested MemorySaving), so the rebuilt inputs are exact there and rounding error never
    accumulates over more than k layers: memory (depth / k) inputs, for flows whose inverses
    amplify error (steep splines). None: keep none.
    """
    layers = list(layers)
    keep_every = check_keep_every(keep_every)
    if not layers:
        raise ValueError("memory_saving_forward needs at least one layer")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    params = _unique_parameters(layers)
    # Eager only: under torch.compile the plain loop is traced (standard backprop).
    wants_grad = torch.is_grad_enabled() and not torch.compiler.is_compiling() and (
        any(p.requires_grad for p in params) or x.requires_grad
        or (isinstance(context, torch.Tensor) and context.requires_grad)
        or (isinstance(logdet, torch.Tensor) and logdet.requires_grad))
    if not wants_grad:
        for layer in layers:
            x, logdet = layer(x, context, logdet)
        return x, logdet
    return _MemorySavingFunction.apply(tuple(layers), keep_every, x, context, logdet, *params)


class MemorySaving(FlowLayer):
    """A sequence of flow layers whose forward keeps no intermediate activations for backprop:
    the backward pass rebuilds each layer's input from its output with the exact inverse and
    recomputes the layer (flowkern.nn.memory). inverse() is the plain sequence of inverses.

    Use it for any stack of flowkern layers (Flow(..., memory_saving=True) does the same for a
    whole flow): MemorySaving(*layers) is a layer itself, so a Flow may hold it next to others.
    keep_every=k keeps every k-th layer's input (see memory_saving_forward).
    """

    def __init__(self, *layers: nn.Module, keep_every: Optional[int] = None):
        super().__init__()
        self.keep_every = check_keep_every(keep_every)
        if len(layers) == 1 and isinstance(layers[0], (list, tuple, nn.ModuleList)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("MemorySaving needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Module):
                raise TypeError(f"layers[{i}] must be a flow layer (an nn.Module), got {type(layer).__name__}")
        self.layers = nn.ModuleList(layers)
        features = getattr(self.layers[0], "features", None)
        if features is not None:
            self.features = features

    def forward(self, x, context=None, logdet=None):
        return memory_saving_forward(self.layers, x, context, logdet, keep_every=self.keep_every)

    def inverse(self, z, context=None, logdet=None):
        for layer in reversed(self.layers):
            z, logdet = layer.inverse(z, context, logdet)
        return z, logdet
