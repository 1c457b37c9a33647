"""The KL autoencoder of Stable Diffusion (diffusers' AutoencoderKL), channels-last.

`encode` gives the posterior over latents (a diagonal Gaussian), `decode` maps latents back to
images; neither applies `scaling_factor` (the pipelines do, as in diffusers). Both take two static
switches that bound memory the way diffusers' `enable_vae_slicing` / `enable_vae_tiling` do: `sliced`
runs the batch one sample at a time, `tiled` runs overlapping tiles one at a time and blends the
overlaps linearly (same tile size, overlap and blend as diffusers, hence the same numbers as its
tiled path). Use them as `model.apply(variables, x, method="encode", tiled=True)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from unclip_jax.models.attention import Attention
from unclip_jax.models.config import config_from_dict
from unclip_jax.models.layers import ACTIVATIONS, Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

_EPS = 1e-6  # diffusers fixes every VAE norm's epsilon

_CHECKS = {
    "down_block_types": lambda v: all(t == "DownEncoderBlock2D" for t in v),
    "up_block_types": lambda v: all(t == "UpDecoderBlock2D" for t in v),
    "act_fn": lambda v: v in ACTIVATIONS,
}


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """config.json keys of diffusers' AutoencoderKL (diffusers' defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    # Used by pipelines of other model families, not by the autoencoder itself.
    shift_factor: float | None = None
    latents_mean: Any = None
    latents_std: Any = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderKLConfig:
        return config_from_dict(cls, d, checks=_CHECKS, name="AutoencoderKLConfig")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def tile_sample_size(self) -> int:
        s = self.sample_size
        return int(s[0] if isinstance(s, (list, tuple)) else s)

    @property
    def tile_latent_size(self) -> int:
        return int(self.tile_sample_size / self.downsample_factor)


@flax.struct.dataclass
class DiagonalGaussian:
    """The posterior N(mean, std^2) over latents, each [B, h, w, latent_channels]. logvar is clamped
    to [-30, 20] as in diffusers (and the LDM code) before std is taken."""

    mean: jax.Array
    std: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """moments [B, h, w, 2L]: mean then log-variance along channels. The posterior is float32
        whatever the compute dtype: latents feed the sampler's float32 arithmetic."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        logvar = jnp.clip(logvar, -30.0, 20.0)
        return cls(mean, jnp.exp(0.5 * logvar), logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        """mean + std * eps, eps ~ N(0, 1) from `key` (or the given `noise`, [B, h, w, L])."""
        if noise is None:
            noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean


class VAEMidBlock(nn.Module):
    """resnet, single-head spatial self-attention (group norm, residual), resnet."""

    channels: int
    groups: int
    act_fn: str = "silu"
    add_attention: bool = True
    query_chunk_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        def resnet(name):
            return ResnetBlock2D(self.channels, self.groups, eps=_EPS, act_fn=self.act_fn, dtype=self.dtype, name=name)

        x = resnet("resnets_0")(x)
        if self.add_attention:
            x = Attention(1, self.channels, self.channels, qkv_bias=True, norm_num_groups=self.groups,
                          norm_eps=_EPS, residual_connection=True, query_chunk_size=self.query_chunk_size,
                          dtype=self.dtype, name="attentions_0")(x)
        return resnet("resnets_1")(x)


class _ResnetStack(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets then an optional down/upsampler."""

    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    resample: str | None  # "down", "up" or None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, eps=_EPS, act_fn=self.act_fn, dtype=self.dtype,
                              name=f"resnets_{i}")(x)
        if self.resample == "down":
            # padding 0: the encoder pads bottom/right only (LDM heritage).
            x = Downsample2D(self.out_channels, 0, self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """[B, H, W, C] image -> [B, H/f, W/f, 2 * latent_channels] moments (before quant_conv)."""

    config: AutoencoderKLConfig
    query_chunk_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = conv(c.block_out_channels[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
        n = len(c.block_out_channels)
        for i, ch in enumerate(c.block_out_channels):
            x = _ResnetStack(ch, c.layers_per_block, c.norm_num_groups, c.act_fn, "down" if i < n - 1 else None,
                             self.dtype, name=f"down_blocks_{i}")(x)
        x = VAEMidBlock(c.block_out_channels[-1], c.norm_num_groups, c.act_fn, c.mid_block_add_attention,
                        self.query_chunk_size, self.dtype, name="mid_block")(x)
        x = ACTIVATIONS[c.act_fn](group_norm(c.norm_num_groups, _EPS, "conv_norm_out")(x)).astype(self.dtype)
        return conv(2 * c.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """[B, h, w, latent_channels] (after post_quant_conv) -> [B, h*f, w*f, out_channels] image."""

    config: AutoencoderKLConfig
    query_chunk_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        c = self.config
        x = conv(c.block_out_channels[-1], 3, self.dtype, "conv_in")(z.astype(self.dtype))
        x = VAEMidBlock(c.block_out_channels[-1], c.norm_num_groups, c.act_fn, c.mid_block_add_attention,
                        self.query_chunk_size, self.dtype, name="mid_block")(x)
        n = len(c.block_out_channels)
        for i, ch in enumerate(reversed(c.block_out_channels)):
            x = _ResnetStack(ch, c.layers_per_block + 1, c.norm_num_groups, c.act_fn, "up" if i < n - 1 else None,
                             self.dtype, name=f"up_blocks_{i}")(x)
        x = ACTIVATIONS[c.act_fn](group_norm(c.norm_num_groups, _EPS, "conv_norm_out")(x)).astype(self.dtype)
        return conv(c.out_channels, 3, self.dtype, "conv_out")(x)


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """Linear cross-fade of b's first `extent` rows (axis 1) or columns (axis 2) from a's last ones."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    w = (jnp.arange(extent, dtype=jnp.float32) / extent).astype(b.dtype)
    w = w.reshape((1, extent, 1, 1) if axis == 1 else (1, 1, extent, 1))
    head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(b, tail * (1 - w) + head * w, 0, axis=axis)


class AutoencoderKL(nn.Module):
    """Stable Diffusion's VAE.

    Attributes:
      config: the architecture.
      dtype: compute dtype (norms and attention softmax stay float32).
      attention_chunk_size: bound the mid-block attention's memory by running query blocks in turn.
    """

    config: AutoencoderKLConfig
    dtype: Any = jnp.float32
    attention_chunk_size: int | None = None

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.attention_chunk_size, self.dtype)
        self.decoder = Decoder(c, self.attention_chunk_size, self.dtype)
        if c.use_quant_conv:
            self.quant_conv = nn.Conv(2 * c.latent_channels, (1, 1), dtype=self.dtype)
        if c.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(c.latent_channels, (1, 1), dtype=self.dtype)

    def __call__(self, sample: jax.Array, key: jax.Array | None = None, sample_posterior: bool = False) -> jax.Array:
        """Reconstruction: decode(encode(sample)) through the posterior's mode (or a sample with `key`)."""
        posterior = self.encode(sample)
        z = posterior.sample(key) if sample_posterior else posterior.mode()
        return self.decode(z)

    def encode(self, sample: jax.Array, tiled: bool = False, sliced: bool = False) -> DiagonalGaussian:
        """sample [B, H, W, in_channels] in [-1, 1] -> posterior over [B, H/f, W/f, latent_channels].

        tiled: encode overlapping tiles of `sample_size` pixels one at a time and blend them (only when
          the image is larger than a tile, as in diffusers).
        sliced: encode the batch one sample at a time.
        """
        c = self.config
        if sample.ndim != 4 or sample.shape[-1] != c.in_channels:
            raise ValueError(f"VAE.encode: sample must be [B, H, W, {c.in_channels}]; got {sample.shape}")
        f = c.downsample_factor
        if sample.shape[1] % f or sample.shape[2] % f:
            raise ValueError(f"VAE.encode: height and width must be multiples of {f}; got {sample.shape[1:3]}")
        return DiagonalGaussian.from_moments(self._per_sample(self._encode_moments, sample, tiled, sliced))

    def decode(self, latents: jax.Array, tiled: bool = False, sliced: bool = False) -> jax.Array:
        """latents [B, h, w, latent_channels] (unscaled) -> image [B, h*f, w*f, out_channels].

        tiled / sliced: as in `encode`, with tiles of `sample_size / f` latents.
        """
        c = self.config
        if latents.ndim != 4 or latents.shape[-1] != c.latent_channels:
            raise ValueError(f"VAE.decode: latents must be [B, h, w, {c.latent_channels}]; got {latents.shape}")
        return self._per_sample(self._decode_sample, latents, tiled, sliced)

    # -- internals -------------------------------------------------------------------------------

    def _per_sample(self, fn: Callable, x: jax.Array, tiled: bool, sliced: bool) -> jax.Array:
        if sliced and x.shape[0] > 1:
            out = _sequential(lambda mdl, xb: fn.__func__(mdl, xb, tiled), self, x[:, None])
            return out.reshape(x.shape[0], *out.shape[2:])
        return fn(x, tiled)

    def _encode_plain(self, x):
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.config.use_quant_conv else moments

    def _decode_plain(self, z):
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _encode_moments(self, x, tiled):
        c = self.config
        t = c.tile_sample_size
        if not tiled or (x.shape[1] <= t and x.shape[2] <= t):
            return self._encode_plain(x)
        tl = c.tile_latent_size
        blend = int(tl * 0.25)
        return _tiled(lambda mdl, tile: mdl._encode_plain(tile), self, x, t, int(t * 0.75), blend, tl - blend)

    def _decode_sample(self, z, tiled):
        c = self.config
        tl = c.tile_latent_size
        if not tiled or (z.shape[1] <= tl and z.shape[2] <= tl):
            return self._decode_plain(z)
        t = c.tile_sample_size
        blend = int(t * 0.25)
        return _tiled(lambda mdl, tile: mdl._decode_plain(tile), self, z, tl, int(tl * 0.75), blend, t - blend)


def _sequential(fn: Callable, module: nn.Module, xs: jax.Array) -> jax.Array:
    """fn(module, x) for each x along xs' leading axis, one after another (a lifted scan), so only one
    application's activations are live at a time."""
    def body(mdl, carry, x):
        return carry, fn(mdl, x)

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
    return scan(module, None, xs)[1]


def _tiled(fn: Callable, module: nn.Module, x: jax.Array, tile: int, stride: int, blend: int,
           keep: int) -> jax.Array:
    """diffusers' tiled encode/decode, channels-last.

    Tiles of `tile` input pixels start every `stride`; each is mapped by fn(module, tile); an output tile
    is cross-faded over `blend` rows with the (already blended) tile above and `blend` columns with the
    one to its left, then cropped to `keep` x `keep` and the crops are concatenated. Tiles of one shape
    run in a lifted scan, one at a time.
    """
    rows, cols = range(0, x.shape[1], stride), range(0, x.shape[2], stride)
    crops = {(i, j): x[:, i:i + tile, j:j + tile] for i in rows for j in cols}
    by_shape: dict[tuple, list] = {}
    for pos, t in crops.items():
        by_shape.setdefault(t.shape, []).append(pos)
    outs = {}
    for positions in by_shape.values():
        stacked = jnp.stack([crops[p] for p in positions])
        mapped = _sequential(fn, module, stacked) if len(positions) > 1 else fn(module, stacked[0])[None]
        for k, p in enumerate(positions):
            outs[p] = mapped[k]
    result_rows = []
    blended: dict[tuple, jax.Array] = {}
    for a, i in enumerate(rows):
        row = []
        for b, j in enumerate(cols):
            t = outs[(i, j)]
            if a > 0:
                t = _blend(blended[(rows[a - 1], j)], t, blend, axis=1)
            if b > 0:
                t = _blend(blended[(i, cols[b - 1])], t, blend, axis=2)
            blended[(i, j)] = t
            row.append(t[:, :keep, :keep])
        result_rows.append(jnp.concatenate(row, axis=2))
    return jnp.concatenate(result_rows, axis=1)


def dummy_inputs(config: AutoencoderKLConfig, batch: int = 1):
    """Inputs for `init` / `eval_shape` (the smallest image the VAE takes)."""
    f = config.downsample_factor
    return (jnp.zeros((batch, f, f, config.in_channels), jnp.float32),)
