"""Test-side helpers for PyTorch reference models (tests only: the package never imports torch).

`randomize_` fills every parameter and buffer of a reference model with non-trivial random values:
default inits leave zero output layers and unit norms, which would hide a transposed kernel or a
swapped norm in the conversion.
"""

from __future__ import annotations

import contextlib
import importlib
import math

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """In place: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), 1-D scales ~ 1 + N(0, 0.2^2), BN stats
    mean ~ N(0, 0.1^2) and var ~ U(0.5, 1.5). Returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif leaf == "running_mean":
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.ndim >= 2:
                fan_in = math.prod(t.shape[1:])
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(fan_in))
            elif leaf == "bias" or leaf.endswith("_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif leaf == "weight" or leaf.endswith("scale"):
                t.copy_(1 + torch.randn(t.shape, generator=g) * 0.2)
            else:  # free vectors such as CLIP's class embedding
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return module.eval()


def to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def nchw_to_nhwc(t) -> np.ndarray:
    return np.moveaxis(to_numpy(t), 1, -1)


def nhwc_to_nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x, dtype=np.float32), -1, 1)))


def assert_close(actual, expected, rel: float, what: str = "") -> None:
    """max |a - e| <= rel * max(|e|.max(), 1e-6): tolerance relative to the output's scale."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max()), 1e-6)
    err = float(np.abs(actual - expected).max())
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:g} x scale {scale:.3g}"


@contextlib.contextmanager
def feed_noise(module_paths, draws):
    """Makes diffusers' `randn_tensor` in the given modules return `draws` (torch NCHW/ND), in order."""
    queue = list(draws)
    saved = []

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        x = queue.pop(0)
        assert tuple(x.shape) == tuple(shape), (x.shape, shape)
        return x.to(dtype or torch.float32)

    for path in module_paths:
        mod = importlib.import_module(path)
        saved.append((mod, mod.randn_tensor))
        mod.randn_tensor = fake
    try:
        yield queue
    finally:
        for mod, fn in saved:
            mod.randn_tensor = fn
    assert not queue, f"{len(queue)} supplied draws were not used"
