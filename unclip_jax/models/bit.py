"""BiT ResNet backbone (Kolesnikov et al. 2020) as transformers' `BitBackbone` computes it for DPT-Hybrid.

The ResNet-50 v1.5 ("bottleneck") variant with weight-standardised convolutions (Qiao et al. 2019)
and group norm, which is what DPT-Hybrid (MiDaS) puts in front of its ViT. Module names mirror
transformers' (`embedder/convolution`, `encoder/stages_0/layers_0/conv1`) so the conversion table is
empty. Channels-last throughout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.config import UnsupportedConfigError, config_from_dict
from unclip_jax.models.layers import ACTIVATIONS


def make_div(value: float, divisor: int = 8) -> int:
    """Rounds a channel count to a multiple of `divisor`, never losing more than 10% (timm's rule)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


@dataclasses.dataclass(frozen=True)
class BitConfig:
    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    layer_type: str = "preactivation"
    hidden_act: str = "relu"
    # None (static symmetric padding), "SAME" (TF-style, input-dependent) or "VALID".
    global_padding: str | None = None
    num_groups: int = 32
    embedding_dynamic_padding: bool = False
    output_stride: int = 32
    width_factor: int = 1
    # Names from ("stem", "stage1", ...): the feature maps the backbone returns.
    out_features: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BitConfig:
        d = dict(d)
        if d.get("global_padding") is not None:
            d["global_padding"] = d["global_padding"].upper()
        config = config_from_dict(
            cls, d, checks=_CHECKS, name="BitConfig",
            out_features=_out_features(d),
        )
        unknown = [n for n in config.out_features if n not in config.stage_names[: config.num_stages + 1]]
        if unknown:
            raise UnsupportedConfigError(f"BitConfig: config key 'out_features' names unknown stages {unknown}")
        # The encoder trades stride for dilation once the output stride is reached; we implement
        # only the undilated network.
        stride = 4
        for i in range(config.num_stages):
            stride *= 1 if i == 0 else 2
            if i > 0 and stride // 2 >= config.output_stride:
                raise UnsupportedConfigError(
                    f"BitConfig: config key 'output_stride' = {config.output_stride} (dilated stages) is not supported"
                )
        return config

    @property
    def num_stages(self) -> int:
        return min(len(self.depths), len(self.hidden_sizes))

    @property
    def stage_names(self) -> tuple[str, ...]:
        return ("stem",) + tuple(f"stage{i + 1}" for i in range(len(self.depths)))

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of each stage's output, stem first."""
        return (self.embedding_size,) + tuple(
            make_div(h * self.width_factor) for h in self.hidden_sizes[: self.num_stages]
        )


_CHECKS = {
    "layer_type": lambda v: v == "bottleneck",
    "hidden_act": lambda v: v in ACTIVATIONS,
    "global_padding": lambda v: v is None or v.upper() in ("SAME", "VALID"),
    "model_type": lambda v: v == "bit",
    "out_features": lambda v: v is None or len(v) > 0,
}


def _out_features(d) -> tuple[str, ...]:
    """Which stages a config asks for: out_features, else out_indices, else the last stage."""
    names = ["stem"] + [f"stage{i + 1}" for i in range(len(d.get("depths", BitConfig.depths)))]
    for key in ("out_features", "_out_features"):
        if d.get(key):
            return tuple(d[key])
    for key in ("out_indices", "_out_indices"):
        if d.get(key):
            return tuple(names[i] for i in d[key])
    return (names[-1],)


def _padding(global_padding: str | None, kernel: int, stride: int):
    """The padding transformers' `get_padding_value` gives a convolution, in lax's terms.

    "SAME" with an odd kernel at stride 1 is static symmetric padding, otherwise TF-style padding
    computed from the input size (more after than before); both are lax's "SAME".
    """
    if global_padding == "SAME":
        return "SAME"
    if global_padding == "VALID":
        return "VALID"
    p = ((stride - 1) + (kernel - 1)) // 2
    return ((p, p), (p, p))


class WeightStandardizedConv(nn.Module):
    """A bias-free conv whose kernel is standardised per output channel before use.

    The kernel [kh, kw, I, O] is normalised to zero mean and unit (biased) variance over (kh, kw, I),
    as transformers does with a training-mode `batch_norm` over the weight; in float32 whatever the
    compute dtype, since the statistics of a few hundred weights are what sets the scale of the output.
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: Any = "SAME"
    eps: float = 1e-8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32
        )
        kernel = kernel.astype(jnp.float32)
        mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
        var = jnp.square(kernel - mean).mean(axis=(0, 1, 2), keepdims=True)
        kernel = (kernel - mean) * jax.lax.rsqrt(var + self.eps)
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.strides, self.strides), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


def _norm_act(config: BitConfig, x, name: str, act: bool = True):
    """transformers' BitGroupNormActivation: group norm (float32 statistics, two-pass variance) and
    optionally the activation. Its weight and bias sit at `name` itself, as a flax GroupNorm's do."""
    y = nn.GroupNorm(
        num_groups=config.num_groups, epsilon=1e-5, dtype=jnp.float32, use_fast_variance=False, name=name
    )(x)
    return ACTIVATIONS[config.hidden_act](y) if act else y


def _max_pool_3x3_s2(x, dynamic_padding: bool):
    """transformers' BitMaxPool2d: TF-"SAME" padding with zeros (not -inf), then a VALID 3x3/2 pool."""
    if dynamic_padding:
        pads = []
        for size in x.shape[1:3]:
            total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)
            pads.append((total // 2, total - total // 2))
        x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


class BitEmbeddings(nn.Module):
    """The stem: a 7x7/2 weight-standardised conv, group norm + activation, a 3x3/2 max pool."""

    config: BitConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        x = WeightStandardizedConv(
            c.embedding_size, 7, 2, _padding(c.global_padding, 7, 2), dtype=self.dtype, name="convolution"
        )(pixel_values)
        if c.global_padding != "SAME":
            # transformers pads the conv output before the norm, so the zeros enter the group statistics.
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = _norm_act(c, x, "norm").astype(self.dtype)
        return _max_pool_3x3_s2(x, c.embedding_dynamic_padding)


class BitBottleneckLayer(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv): act(norm3(conv3(...)) + shortcut)."""

    config: BitConfig
    out_channels: int
    stride: int
    is_first_layer: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, s = self.config, self.stride
        mid = make_div(self.out_channels * 0.25)
        shortcut = x
        if self.is_first_layer:
            shortcut = _Downsample(c, self.out_channels, s, self.dtype, name="downsample")(x)
        conv = lambda f, k, st, name: WeightStandardizedConv(  # noqa: E731
            f, k, st, _padding(c.global_padding, k, st), dtype=self.dtype, name=name
        )
        x = _norm_act(c, conv(mid, 1, 1, "conv1")(x), "norm1").astype(self.dtype)
        x = _norm_act(c, conv(mid, 3, s, "conv2")(x), "norm2").astype(self.dtype)
        x = _norm_act(c, conv(self.out_channels, 1, 1, "conv3")(x), "norm3", act=False)
        return ACTIVATIONS[c.hidden_act](x + shortcut.astype(jnp.float32)).astype(self.dtype)


class _Downsample(nn.Module):
    config: BitConfig
    out_channels: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = WeightStandardizedConv(
            self.out_channels, 1, self.stride, _padding(c.global_padding, 1, self.stride), dtype=self.dtype,
            name="conv",
        )(x)
        return _norm_act(c, x, "norm", act=False)


class BitStage(nn.Module):
    config: BitConfig
    out_channels: int
    stride: int
    depth: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            x = BitBottleneckLayer(
                self.config, self.out_channels, self.stride if i == 0 else 1, i == 0, self.dtype, name=f"layers_{i}"
            )(x)
        return x


class BitEncoder(nn.Module):
    config: BitConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """Returns the stem output and every stage's output: ([B, H/4, W/4, C0], [B, H/4, W/4, C1], ...)."""
        c = self.config
        states = [x]
        for s in range(c.num_stages):
            x = BitStage(c, c.stage_channels[s + 1], 1 if s == 0 else 2, c.depths[s], self.dtype, name=f"stages_{s}")(x)
            states.append(x)
        return tuple(states)


class BitModel(nn.Module):
    config: BitConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        x = BitEmbeddings(self.config, self.dtype, name="embedder")(pixel_values)
        return BitEncoder(self.config, self.dtype, name="encoder")(x)


class BitBackbone(nn.Module):
    """transformers' BitBackbone (bottleneck layers): the feature maps named by `out_features`.

    pixel_values [B, H, W, C] -> tuple of [B, h_i, w_i, C_i], in stage order.
    """

    config: BitConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        states = BitModel(c, self.dtype, name="bit")(pixel_values)
        return tuple(states[c.stage_names.index(n)] for n in c.out_features)
