"""Glow (Kingma & Dhariwal, 2018): a multi-scale convolutional flow for images."""
from __future__ import annotations

from typing import Sequence, Union

from ..nn import ConvAffineCoupling, Flow, StandardNormal
from ._common import preprocess_layers


class Glow(Flow):
    """Multi-scale Glow on (B, C, H, W) images.

    Each of the `levels` levels squeezes 2x2 space into channels, runs `steps` steps of
    (ActNorm, invertible 1x1 conv, affine coupling with a conv conditioner of width `hidden`),
    then factors out half of its channels, which go to the N(0, I) base unchanged, and hands
    the other half to the next level (the last level keeps everything). Every level unsqueezes
    at its end, so the latent z has the shape of the image and the base is one standard normal
    over it: exactly the multi-scale architecture of the paper.

    H and W must be divisible by 2**levels: 28x28 MNIST takes levels <= 2 (28 -> 14 -> 7).
    dequantize=True (or "uniform") starts with the fused Dequantize + Logit so the model takes
    8-bit pixels; "variational" starts with VariationalDequantize (Flow++'s learned noise).
    memory_saving=True backprops without keeping activations, rebuilding them with the layers'
    exact inverses at every level; an int k also keeps every k-th layer's input (see Flow and
    flowkern.nn.memory).
    """

    def __init__(self, image_shape: Sequence[int] = (1, 28, 28), levels: int = 2, steps: int = 8,
                 hidden: int = 512, *, scale: str = "tanh", context: int = 0,
                 dequantize: Union[bool, str] = False, alpha: float = 1e-6, memory_saving: Union[bool, int] = False):
        from ..nn.linear import Invertible1x1Conv
        from ..nn.norm import ActNorm
        from ..nn.reshape import Split, Squeeze, Unsqueeze

        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (channels, height, width), got {image_shape!r}")
        if not isinstance(levels, int) or levels < 1 or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"levels and steps must be positive ints, got levels={levels!r}, steps={steps!r}")
        c, h, w = image_shape
        if h % 2 ** levels or w % 2 ** levels:
            raise ValueError(f"image height and width must be divisible by 2**levels = {2 ** levels} "
                             f"(got {h}x{w}); use fewer levels (28x28 MNIST: levels <= 2)")

        def level(channels: int, depth: int) -> list:
            channels *= 4
            layers = [Squeeze()]
            for k in range(steps):
                layers += [ActNorm(channels), Invertible1x1Conv(channels),
                           ConvAffineCoupling(channels, hidden, scale=scale, context=context, flip=k % 2 == 1)]
            if depth + 1 < levels:
                layers.append(Split(*level(channels - channels // 2, depth + 1)))
            return layers + [Unsqueeze()]

        super().__init__(preprocess_layers(dequantize, alpha, image_shape) + level(c, 0), StandardNormal(image_shape),
                         memory_saving=memory_saving)
        self.image_shape = image_shape
