"""Flows for low-dimensional, conditional density estimation (simulation-based inference):
MAF and NSF, by default the architectures of sbi's `maf` and `nsf` density estimators."""
from __future__ import annotations

from typing import Optional, Union

from torch import nn

from ..nn import (Flow, LinearLU, MaskedAutoregressiveAffine, MaskedAutoregressiveSpline, Permutation,
                  SplineCoupling, StandardNormal)
from ..nn.nets import Activation, _size

PERMUTATIONS = ("random", "reverse")


def _made_layers(blocks: int, residual: bool) -> int:
    """MADE's `layers` for nflows' num_blocks: its initial layer plus `blocks` hidden (or
    residual) blocks."""
    return _size("blocks", blocks) if residual else _size("blocks", blocks) + 1


def _permutation(kind: str, features: int) -> Permutation:
    if kind not in PERMUTATIONS:
        raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {kind!r}")
    return Permutation(features, kind)


class MAF(Flow):
    """Masked Autoregressive Flow (Papamakarios et al. 2017): `layers` MaskedAutoregressiveAffine
    layers, each followed by a permutation. Their MADEs are `hidden` wide with `blocks` as
    nflows counts them (num_blocks): blocks + 1 hidden layers, or with residual=True a first
    layer and `blocks` residual blocks.

    The defaults are sbi's `maf`: 5 layers, hidden 50, num_blocks 2 (3 hidden layers), tanh, a
    random permutation after each layer. The scale (the affine op's, with its clamp): "softplus" is
    nflows 0.14's MaskedAffineAutoregressiveTransform (what sbi's maf runs), "sigmoid" normflows',
    "rational" with clamp = -log(slope) zuko's MAF (slope 1e-3: clamp 6.908), "tanh" (default,
    clamp 2) the soft-clamped exp of FrEIA.

    Args:
        features: D of the (B, D) data.
        context: width of the conditioning vector (0: unconditional), after `embedding`.
        inverse_autoregressive: IAF layers (one-pass sampling, D-pass density).
        embedding: a module the context goes through first (sbi's embedding_net).
        residual, dropout: the MADEs' options (each MADE takes the natural order; the
            permutations between layers reorder the features).
        memory_saving: as Flow's.
    """

    def __init__(self, features: int, context: int = 0, layers: int = 5, hidden: int = 50, *, blocks: int = 2,
                 scale: str = "tanh", clamp: float = 2.0, activation: Activation = "tanh",
                 permutation: str = "random", inverse_autoregressive: bool = False, residual: bool = False,
                 dropout: float = 0.0, embedding: Optional[nn.Module] = None,
                 memory_saving: Union[bool, int] = False):
        features, layers = _size("features", features), _size("layers", layers)
        mods = []
        for _ in range(layers):
            mods.append(MaskedAutoregressiveAffine(features, hidden, layers=_made_layers(blocks, residual),
                                                   context=context, scale=scale, clamp=clamp,
                                                   inverse_autoregressive=inverse_autoregressive, residual=residual,
                                                   activation=activation, dropout=dropout))
            mods.append(_permutation(permutation, features))
        super().__init__(mods, StandardNormal(features), memory_saving=memory_saving, embedding=embedding)
        self.features, self.context_features = features, context


class NSF(Flow):
    """Neural Spline Flow (Durkan et al. 2019): `layers` rational-quadratic spline layers with
    `bins` bins on [-bound, bound] (linear tails), coupling or autoregressive.

    autoregressive=False (default): sbi's `nsf`: SplineCoupling layers with alternating masks
    and a ResidualNet conditioner (hidden 50, 2 blocks; conditioner="mlp" or a factory
    f(in_features, out_features) for another), each followed by a LinearLU. Couplings need
    features >= 2. autoregressive=True: MaskedAutoregressiveSpline layers (MADEs with nflows'
    num_blocks = `blocks`: residual blocks with conditioner="residual", blocks + 1 hidden layers
    with "mlp"), each followed by a permutation (zuko's NSF; sbi's `maf_rqs`).

    Args:
        features: D; context: the conditioning width after `embedding` (0: unconditional).
        embedding: a module the context goes through first (sbi's embedding_net).
        memory_saving: as Flow's.
    """

    def __init__(self, features: int, context: int = 0, layers: int = 5, hidden: int = 50, *, bins: int = 10,
                 bound: float = 3.0, autoregressive: bool = False, conditioner="residual", blocks: int = 2,
                 permutation: str = "random", inverse_autoregressive: bool = False,
                 activation: Activation = "relu", embedding: Optional[nn.Module] = None,
                 memory_saving: Union[bool, int] = False):
        features, layers = _size("features", features), _size("layers", layers)
        mods = []
        if autoregressive:
            if conditioner not in ("residual", "mlp"):
                raise ValueError("conditioner: the autoregressive NSF's conditioner is a MADE: 'residual' (residual "
                                 f"blocks) or 'mlp', got {conditioner!r}")
            for _ in range(layers):
                mods.append(MaskedAutoregressiveSpline(
                    features, hidden, bins=bins, bound=bound, layers=_made_layers(blocks, conditioner == "residual"),
                    context=context,
                    inverse_autoregressive=inverse_autoregressive, residual=conditioner == "residual",
                    activation=activation))
                mods.append(_permutation(permutation, features))
        else:
            if features < 2:
                raise ValueError("features: a coupling NSF needs features >= 2 (one kept, one transformed); "
                                 "use autoregressive=True for one feature")
            if inverse_autoregressive:
                raise ValueError("inverse_autoregressive needs autoregressive=True")
            if isinstance(conditioner, nn.Module):
                raise TypeError("conditioner: a model builds one network per layer; pass 'residual', 'mlp' or a "
                                "factory f(in_features, out_features) -> nn.Module, not a module")
            for i in range(layers):
                if conditioner in ("residual", "mlp"):
                    from ..nn.nets import MLP, ResidualNet

                    kind = ResidualNet if conditioner == "residual" else MLP
                    depth = {"blocks": blocks} if conditioner == "residual" else {"layers": _made_layers(blocks, False)}

                    def net(i_f, o_f, kind=kind, depth=depth):
                        return kind(i_f, o_f, hidden=hidden, context=context, activation=activation, **depth)
                else:
                    net = conditioner
                mods.append(SplineCoupling(features, hidden, bins=bins, bound=bound, mask="alternate",
                                           context=context, flip=i % 2 == 1, conditioner=net))
                mods.append(LinearLU(features))
        super().__init__(mods, StandardNormal(features), memory_saving=memory_saving, embedding=embedding)
        self.features, self.context_features = features, context
