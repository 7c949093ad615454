"""Conditioner networks: what predicts a coupling's (or an autoregressive layer's) transform from
the features it keeps and an optional context.

A conditioner is any nn.Module called as net(kept) in an unconditional layer and as
net(kept, context) in a conditional one, returning (B, out_features) (images: (B, out_channels,
H, W)). The built-in ones take the context at construction (context=C) and use it as their
design says; a user's module decides for itself. `build_conditioner` turns what a layer's
`conditioner=` argument holds ("mlp", "residual", a module, or a factory
f(in_features, out_features) -> nn.Module, nflows' convention) into the module, and checks
it once on zeros before the layer does any work.

Identity at init. A flow layer starts as the identity when its conditioner's output is a fixed
vector at init (zero, plus the layer's own offsets: the raw scale where m = 1, the raw
derivatives where the spline's slope is 1). The layers do that through `output_layer`: the
last nn.Linear / nn.Conv2d registered in the network whose output width is the network's;
its weight is zeroed and its bias set. `zero_last_layer` does the same for your own use.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Optional, Union

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU,
               "leaky_relu": nn.LeakyReLU}
BUILTIN = ("mlp", "residual")

Activation = Union[str, Callable[[], nn.Module]]


def _size(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _flag(name: str, value) -> bool:
    from ..ops import _checks

    return _checks.flag(name, value)


def _dropout(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {value!r}")
    return float(value)


def activation_factory(activation: Activation) -> Callable[[], nn.Module]:
    """A name of ACTIVATIONS or a zero-argument callable returning a module (nn.ReLU, ...)."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)} or a module factory such as nn.ReLU, "
                             f"got {activation!r}")
        return ACTIVATIONS[activation]
    if isinstance(activation, nn.Module) or not callable(activation):
        raise TypeError("activation must be a name or a zero-argument callable returning a module (e.g. nn.ReLU), "
                        f"got {type(activation).__name__}")
    return activation


def _check_context(context: Optional[torch.Tensor], width: int, batch: int, net: str) -> None:
    if width and context is None:
        raise ValueError(f"this {net} is conditional: call it as net(x, context) with context of shape "
                         f"(batch, {width})")
    if not width and context is not None:
        raise ValueError(f"this {net} was built with context=0: it takes no context")
    if width and (context.dim() != 2 or context.shape != (batch, width)):
        raise ValueError(f"context must have shape ({batch}, {width}), got {tuple(context.shape)}")


class MLP(nn.Sequential):
    """in (+ context) -> hidden -> ... -> out: `layers` hidden layers of width `hidden`, each
    followed by the activation (and dropout); the context, if any, is concatenated to the
    input. The last layer starts at zero (the flow layers set its bias: see the module doc).

    Called as net(x) or net(x, context) with context of shape (B, context).
    """

    def __init__(self, in_features: int, out_features: int, *, hidden: int = 64, layers: int = 2, context: int = 0,
                 activation: Activation = "relu", dropout: float = 0.0):
        in_features, out_features = _size("in_features", in_features), _size("out_features", out_features)
        hidden, layers, context = _size("hidden", hidden), _size("layers", layers), _size("context", context, 0)
        act, dropout = activation_factory(activation), _dropout(dropout)
        mods, width = [], in_features + context
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), act()] + ([nn.Dropout(dropout)] if dropout else [])
            width = hidden
        mods.append(nn.Linear(width, out_features))
        super().__init__(*mods)
        self.context_features = context
        zero_last_layer(self)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_context(context, self.context_features, x.shape[0], "MLP")
        if context is not None:
            x = torch.cat([x, context.to(x.dtype)], dim=1)
        return super().forward(x)


class _ResidualBlock(nn.Module):
    """h + Linear(act(Linear([act(norm(h)), context]))), pre-activation; the block's last
    layer starts at zero, so a new block is the identity."""

    def __init__(self, hidden: int, context: int, act: Callable[[], nn.Module], dropout: float, batch_norm: bool):
        super().__init__()
        self.norm = nn.BatchNorm1d(hidden, eps=1e-3) if batch_norm else None
        self.act1, self.act2 = act(), act()
        self.inner = nn.Linear(hidden + context, hidden)
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.outer = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.outer.weight)
        nn.init.zeros_(self.outer.bias)

    def forward(self, h: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        t = self.act1(self.norm(h) if self.norm is not None else h)
        if context is not None:
            t = torch.cat([t, context], dim=1)
        t = self.act2(self.inner(t))
        if self.dropout is not None:
            t = self.dropout(t)
        return h + self.outer(t)


class ResidualNet(nn.Module):
    """Linear(in + context -> hidden), `blocks` pre-activation residual blocks with the context
    concatenated to every block's input, Linear(hidden -> out) (zero at start): the conditioner
    sbi's NSF uses (nflows' ResidualNet design; batch_norm=True adds its BatchNorm).

    Called as net(x) or net(x, context) with context of shape (B, context).
    """

    def __init__(self, in_features: int, out_features: int, *, hidden: int = 64, blocks: int = 2, context: int = 0,
                 activation: Activation = "relu", dropout: float = 0.0, batch_norm: bool = False):
        super().__init__()
        in_features, out_features = _size("in_features", in_features), _size("out_features", out_features)
        hidden, blocks, context = _size("hidden", hidden), _size("blocks", blocks), _size("context", context, 0)
        act, dropout = activation_factory(activation), _dropout(dropout)
        self.context_features = context
        self.first = nn.Linear(in_features + context, hidden)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden, context, act, dropout, _flag("batch_norm", batch_norm))
                                    for _ in range(blocks))
        self.last = nn.Linear(hidden, out_features)
        zero_last_layer(self)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_context(context, self.context_features, x.shape[0], "ResidualNet")
        if context is not None:
            context = context.to(x.dtype)
            x = torch.cat([x, context], dim=1)
        h = self.first(x)
        for block in self.blocks:
            h = block(h, context)
        return self.last(h)


class ConvNet(nn.Sequential):
    """Glow's conditioner for images: 3x3 conv -> act -> (1x1 conv -> act) x (layers - 1) ->
    3x3 conv, the last one zero at start. A context (B, C_ctx) is broadcast over the image as
    extra input channels. Called as net(x) or net(x, context)."""

    def __init__(self, in_channels: int, out_channels: int, *, hidden: int = 512, layers: int = 2, context: int = 0,
                 activation: Activation = "relu", dropout: float = 0.0):
        in_channels, out_channels = _size("in_channels", in_channels), _size("out_channels", out_channels)
        hidden, layers, context = _size("hidden", hidden), _size("layers", layers), _size("context", context, 0)
        act, dropout = activation_factory(activation), _dropout(dropout)
        mods = [nn.Conv2d(in_channels + context, hidden, 3, padding=1), act()]
        for _ in range(layers - 1):
            mods += ([nn.Dropout(dropout)] if dropout else []) + [nn.Conv2d(hidden, hidden, 1), act()]
        mods.append(nn.Conv2d(hidden, out_channels, 3, padding=1))
        super().__init__(*mods)
        self.context_features = context
        zero_last_layer(self)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_context(context, self.context_features, x.shape[0], "ConvNet")
        if context is not None:
            c = context.to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, c], dim=1)
        return super().forward(x)


_OUTPUT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def draws_noise(net: nn.Module) -> bool:
    """Whether net, as it is now, draws random numbers in forward: a dropout module with p > 0
    in training mode. (A network that calls F.dropout itself is not seen: give such a layer
    `stochastic = True`.) Memory-saving backprop replays such a layer's random stream."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in net.modules())


@contextlib.contextmanager
def quietly(net: nn.Module, eval_mode: bool):
    """Runs a trial call of net without side effects: no grad, the global random streams forked
    (torch.random.fork_rng), every buffer (BatchNorm statistics, counters) put back afterwards,
    and, with eval_mode, eval() for the call and each module's own mode restored by train()."""
    buffers = [(b, b.detach().clone()) for b in net.buffers()]
    modes = [(m, m.training) for m in net.modules()]
    devices = [d for d in {b.device for b in list(net.parameters()) + list(net.buffers())} if d.type == "cuda"]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            if eval_mode:
                net.eval()
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            if m.training != mode:
                m.train(mode)


def output_layer(net: nn.Module, out_features: Optional[int] = None) -> Optional[nn.Module]:
    """The last nn.Linear / nn.ConvNd registered in net (with out_features outputs, when given),
    or None."""
    last = None
    for m in net.modules():
        if isinstance(m, _OUTPUT_TYPES):
            last = m
    if last is None:
        return None
    width = last.out_features if isinstance(last, nn.Linear) else last.out_channels
    return last if out_features is None or width == out_features else None


def zero_last_layer(net: nn.Module, bias: Optional[torch.Tensor] = None) -> nn.Module:
    """Zeroes the weight of net's last nn.Linear / nn.ConvNd (in registration order) and sets
    its bias to `bias` (zero by default), so that net's output at init is that constant vector
    whatever the input, if the layer is net's output. Returns net."""
    layer = output_layer(net)
    if layer is None:
        raise ValueError(f"zero_last_layer: {type(net).__name__} has no nn.Linear or nn.Conv layer")
    with torch.no_grad():
        layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.copy_(torch.zeros_like(layer.bias) if bias is None else bias.reshape(layer.bias.shape))
        elif bias is not None and bool(torch.any(bias != 0)):
            raise ValueError(f"zero_last_layer: the last layer of {type(net).__name__} has no bias to set")
    return net


def _takes_context(net: nn.Module) -> bool:
    """Whether net(x, context) binds: forward takes a second positional argument."""
    try:
        inspect.signature(net.forward).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature (a C extension): assume it does
        return True
    return True


def build_conditioner(conditioner, in_features: int, out_features: int, *, context: int, hidden: int,
                      images: bool) -> nn.Module:
    """The module a layer's `conditioner=` argument stands for, checked once.

    "mlp" / "residual": flowkern's MLP (ConvNet for images) / ResidualNet, `hidden` wide, with the
    context. A factory is called as f(in_features, out_features) (nflows' convention; the
    context, if any, is passed at call time: net(kept, context)). A module is used as it is.
    """
    if isinstance(conditioner, str):
        if conditioner not in BUILTIN:
            raise ValueError(f"conditioner must be one of {BUILTIN}, an nn.Module or a factory "
                             f"f(in_features, out_features) -> nn.Module, got {conditioner!r}")
        if images:
            if conditioner != "mlp":
                raise ValueError(f"conditioner={conditioner!r}: the conv couplings' built-in conditioner is the "
                                 "ConvNet ('mlp'); pass a module or a factory for another")
            return ConvNet(in_features, out_features, hidden=hidden, context=context)
        net_cls = MLP if conditioner == "mlp" else ResidualNet
        return net_cls(in_features, out_features, hidden=hidden, context=context)
    if isinstance(conditioner, nn.Module):
        net = conditioner
    elif callable(conditioner):
        net = conditioner(in_features, out_features)
        if not isinstance(net, nn.Module):
            raise TypeError(f"conditioner: the factory returned {type(net).__name__}, not an nn.Module")
    else:
        raise TypeError(f"conditioner must be one of {BUILTIN}, an nn.Module or a factory "
                        f"f(in_features, out_features) -> nn.Module, got {type(conditioner).__name__}")
    if context and not _takes_context(net):
        raise ValueError(f"conditioner: a conditional layer (context={context}) calls it as net(kept, context), "
                         f"but {type(net).__name__}.forward takes one input; use flowkern.nn.MLP(in, out, "
                         f"context={context}) or give its forward a context argument")
    _probe(net, in_features, out_features, context, images)
    return net


def trial_inputs(net: nn.Module, batch: int, in_features: int, context: int, spatial: tuple, seed=None):
    """Inputs for a trial call of net, on its parameters' device and dtype: zeros, or normal
    draws from a generator of their own when seed is given."""
    p = next(net.parameters(), None)
    kw = {"device": p.device, "dtype": p.dtype} if p is not None and p.is_floating_point() else {}
    if seed is None:
        make = lambda *shape: torch.zeros(*shape, **kw)  # noqa: E731
    else:
        gen = torch.Generator(kw.get("device", "cpu")).manual_seed(seed)
        make = lambda *shape: torch.randn(*shape, generator=gen, **kw)  # noqa: E731
    x = make(batch, in_features, *spatial)
    return (x, make(batch, context)) if context else (x,)


def on_meta(net: nn.Module) -> bool:
    p = next(net.parameters(), None)
    return p is not None and p.device.type == "meta"


# Trial image sizes: small first (cheap for wide ConvNets); a network that downsamples (a U-Net)
# needs a larger one.
TRIAL_SPATIAL = ((4, 4), (32, 32))


def _probe(net: nn.Module, in_features: int, out_features: int, context: int, images: bool) -> None:
    """Calls net once on zeros (quietly: eval mode, no grad, buffers, modes and the random
    streams as they were) and checks its output's shape, so a wrong width fails at
    construction, naming the argument."""
    if on_meta(net):
        return
    call = "net(kept, context)" if context else "net(kept)"
    for k, spatial in enumerate(TRIAL_SPATIAL if images else ((),)):
        args = trial_inputs(net, 2, in_features, context, spatial)
        try:
            with quietly(net, eval_mode=True):
                out = net(*args)
            break
        except Exception as e:
            if k + 1 < len(TRIAL_SPATIAL if images else ((),)):
                continue
            raise ValueError(f"conditioner: {call} on a {tuple(args[0].shape)} input"
                             f"{f' and a (2, {context}) context' if context else ''} raised "
                             f"{type(e).__name__}: {e}") from e
    want = (2, out_features, *spatial)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"conditioner: its output must have shape (batch, {out_features}{', H, W' if images else ''})"
                         f" (the layer's parameters per transformed feature times their count), got {got} "
                         f"for a {tuple(args[0].shape)} input")
