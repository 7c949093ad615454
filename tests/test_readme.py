"""The README's Python examples run as written, in order, in one namespace (the README reads
as one session). The only additions are the tensors its prose leaves to the reader, each
defined right before the block that uses it with the shape that block's text gives."""
from __future__ import annotations

import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def python_blocks() -> list[str]:
    with open(README) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def inputs_for(block: str) -> dict:
    """The tensors a block uses but no earlier block defines."""
    g = torch.Generator().manual_seed(0)
    B, D = 256, 784
    out = {}
    if "affine_coupling(x, shift, scale_raw" in block:  # the op on (B, D) shift and raw scale
        out.update(shift=0.1 * torch.randn(B, D, generator=g), scale_raw=0.1 * torch.randn(B, D, generator=g))
    if "ops.actnorm(x, shift, log_scale)" in block:  # the per-feature ops: (D,) parameters
        out.update(shift=0.1 * torch.randn(D, generator=g), log_scale=0.1 * torch.randn(D, generator=g),
                   log_gamma=0.1 * torch.randn(D, generator=g), beta=0.1 * torch.randn(D, generator=g),
                   running_mean=torch.randn(D, generator=g), running_var=torch.rand(D, generator=g) + 0.5,
                   pixels_uint8=torch.randint(0, 256, (B, D), generator=g, dtype=torch.uint8),
                   noise=torch.rand(B, D, generator=g), k=D // 2,
                   params=0.1 * torch.randn(B, D, generator=g))
    return out


@pytest.mark.slow
def test_readme_python_examples_run():
    blocks = python_blocks()
    assert len(blocks) >= 5
    torch.manual_seed(0)
    ns: dict = {}
    for i, block in enumerate(blocks):
        ns.update(inputs_for(block))
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), ns)
        except Exception as e:  # noqa: BLE001 - name the block in the failure
            pytest.fail(f"README python block {i + 1} raised {type(e).__name__}: {e}\n{block}")
    # What the examples state about their results.
    assert ns["samples"].shape == (64, 784)
    torch.testing.assert_close(ns["inv_logdet"], -ns["logdet"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ns["x_back"], ns["x"], rtol=1e-4, atol=1e-4)  # x: the op's inverse gave it back
    assert ns["images"].shape == (16, 1, 28, 28)
    assert ns["images"].min() >= 0 and ns["images"].max() <= 255
    assert ns["bpd"].shape == (64,) and torch.isfinite(ns["bpd"]).all()
