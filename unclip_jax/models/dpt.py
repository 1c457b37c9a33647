"""DPT depth estimation (Ranftl et al. 2021, "Vision Transformers for Dense Prediction") as
transformers' `DPTForDepthEstimation` computes it: the plain ViT model (Intel/dpt-large) and the
hybrid one whose tokens come from a BiT ResNet (Intel/dpt-hybrid-midas, the `depth_estimator` of
stable-diffusion-2-depth).

ViT tokens from a few encoder layers are reassembled into image-like maps at 1/32..1/4 of the input
(`neck/reassemble_stage`), fused coarse to fine by residual conv units (`neck/fusion_stage`), and a
small conv head turns the finest map into a non-negative inverse depth at the input resolution.
Module names mirror transformers' (`dpt/encoder/layer_3/attention/attention/query`,
`neck/fusion_stage/layers_0/residual_layer2/convolution1`) so conversion needs no renames.
Channels-last throughout; inference only (dropout is the identity). Norm statistics and the
attention softmax are float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from unclip_jax.models.attention import attention, merge_heads, split_heads
from unclip_jax.models.bit import BitBackbone, BitConfig
from unclip_jax.models.config import UnsupportedConfigError, config_from_dict, config_to_dict
from unclip_jax.models.layers import ACTIVATIONS, layer_norm
from unclip_jax.models.resize import resize_bilinear

# What transformers' DPTConfig builds for a hybrid model whose config.json has no backbone_config.
_DEFAULT_HYBRID_BACKBONE = {
    "model_type": "bit",
    "global_padding": "same",
    "layer_type": "bottleneck",
    "depths": [3, 4, 9],
    "out_features": ["stage1", "stage2", "stage3"],
    "embedding_dynamic_padding": True,
}


@dataclasses.dataclass(frozen=True)
class DPTConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 384
    patch_size: int = 16
    num_channels: int = 3
    is_hybrid: bool = False
    qkv_bias: bool = True
    # ViT layers whose outputs feed the neck (for the hybrid model only the entries after the first two:
    # the first two neck inputs are BiT feature maps).
    backbone_out_indices: tuple[int, ...] = (2, 5, 8, 11)
    # How the class token enters the patch tokens: "ignore", "add" or "project" (concat + Dense + act).
    readout_type: str = "project"
    reassemble_factors: tuple[float, ...] = (4, 2, 1, 0.5)
    neck_hidden_sizes: tuple[int, ...] = (96, 192, 384, 768)
    fusion_hidden_size: int = 256
    head_in_index: int = -1
    use_batch_norm_in_fusion_residual: bool = False
    use_bias_in_fusion_residual: bool | None = None
    add_projection: bool = False
    backbone_config: BitConfig | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DPTConfig:
        d = dict(d)
        hybrid = bool(d.get("is_hybrid", False))
        for key in ("backbone", "use_timm_backbone", "use_pretrained_backbone"):
            if d.get(key):
                raise UnsupportedConfigError(f"DPTConfig: config key {key!r} = {d[key]!r} is not supported")
        backbone = d.get("backbone_config")
        if backbone is not None and not hybrid:
            # A DPT head over another model's backbone (DINOv2, BEiT, Swin): not implemented.
            raise UnsupportedConfigError("DPTConfig: config key 'backbone_config' without 'is_hybrid' is not supported")
        overrides = {}
        if hybrid:
            bit = BitConfig.from_dict({**_DEFAULT_HYBRID_BACKBONE, **(backbone or {})})
            if len(bit.out_features) != 3:
                raise UnsupportedConfigError(
                    f"DPTConfig: the hybrid backbone must return 3 feature maps, got out_features {bit.out_features}"
                )
            overrides["backbone_config"] = bit
            if tuple(d.get("neck_ignore_stages", (0, 1))) != (0, 1):
                raise UnsupportedConfigError(
                    f"DPTConfig: config key 'neck_ignore_stages' = {d['neck_ignore_stages']!r} is not supported"
                )
        for key in ("image_size", "patch_size"):
            v = d.get(key)
            if isinstance(v, (list, tuple)):
                if len(set(v)) != 1:
                    raise UnsupportedConfigError(f"DPTConfig: config key {key!r} = {v!r} (not square) is not supported")
                overrides[key] = v[0]
        config = config_from_dict(cls, d, checks=_CHECKS, name="DPTConfig", **overrides)
        if hybrid and config.readout_type != "project":
            raise UnsupportedConfigError(
                f"DPTConfig: config key 'readout_type' = {config.readout_type!r} is not supported by DPT-Hybrid"
            )
        for f in config.reassemble_factors:
            if (f < 1 and (1 / f) != int(1 / f)) or (f > 1 and f != int(f)):
                raise UnsupportedConfigError(f"DPTConfig: config key 'reassemble_factors' has {f}, not n or 1/n")
        n = len(config.neck_hidden_sizes)
        if len(config.reassemble_factors) < n:
            raise UnsupportedConfigError("DPTConfig: 'reassemble_factors' is shorter than 'neck_hidden_sizes'")
        if len(config.vit_out_layers) + (2 if hybrid else 0) != n:
            raise UnsupportedConfigError(
                f"DPTConfig: 'backbone_out_indices' = {config.backbone_out_indices} selects "
                f"{len(config.vit_out_layers)} ViT layers; the neck takes {n} feature maps"
            )
        if not -n <= config.head_in_index < n:
            raise UnsupportedConfigError(
                f"DPTConfig: config key 'head_in_index' = {config.head_in_index} is out of range"
            )
        if config.add_projection and config.fusion_hidden_size != 256:
            # transformers' head projection is a fixed 256 -> 256 conv.
            raise UnsupportedConfigError("DPTConfig: 'add_projection' needs 'fusion_hidden_size' = 256")
        return config

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that `from_dict` (and transformers' DPTConfig) reads back."""
        d = config_to_dict(self)
        d["model_type"] = "dpt"
        if self.backbone_config is not None:
            d["backbone_config"] = {**config_to_dict(self.backbone_config), "model_type": "bit"}
        return d

    @property
    def vit_out_layers(self) -> tuple[int, ...]:
        """The ViT layers whose outputs go to the neck, in layer order (as transformers filters them)."""
        wanted = self.backbone_out_indices[2:] if self.is_hybrid else self.backbone_out_indices
        return tuple(i for i in range(self.num_hidden_layers) if i in wanted)

    @property
    def fusion_use_bias(self) -> bool:
        if self.use_bias_in_fusion_residual is not None:
            return self.use_bias_in_fusion_residual
        return not self.use_batch_norm_in_fusion_residual


_CHECKS = {
    "model_type": lambda v: v == "dpt",
    "hidden_act": lambda v: v in ACTIVATIONS,
    "readout_type": lambda v: v in ("ignore", "add", "project"),
}


@flax.struct.dataclass
class DPTDepthOutput:
    """What DPTForDepthEstimation returns.

    predicted_depth: [B, H', W'] float32 relative inverse depth. H' = H for the real models (16-pixel
      patches, an even token grid); otherwise whatever size transformers' layers give.
    hidden_states: the ViT embeddings and every encoder layer's output ([B, 1 + T, D], ...), when asked for.
    """

    predicted_depth: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


# ---------------------------------------------------------------------------------------------------
# ViT


class _DenseIn(nn.Module):
    """A module holding one Dense called `dense` (transformers' ViTSelfOutput / ViTIntermediate / ViTOutput)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, dtype=self.dtype, name="dense")(x)


class DPTSelfAttention(nn.Module):
    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda name: nn.Dense(c.hidden_size, use_bias=c.qkv_bias, dtype=self.dtype, name=name)  # noqa: E731
        q = split_heads(dense("query")(x), c.num_attention_heads)
        k = split_heads(dense("key")(x), c.num_attention_heads)
        v = split_heads(dense("value")(x), c.num_attention_heads)
        return merge_heads(attention(q, k, v))


class _ViTAttention(nn.Module):
    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = DPTSelfAttention(self.config, self.dtype, name="attention")(x)
        return _DenseIn(self.config.hidden_size, self.dtype, name="output")(x)


class DPTViTLayer(nn.Module):
    """Pre-norm ViT block: x + attn(ln_before(x)); x + mlp(ln_after(x))."""

    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = layer_norm(c.layer_norm_eps, "layernorm_before")(x).astype(self.dtype)
        x = x + _ViTAttention(c, self.dtype, name="attention")(h)
        h = layer_norm(c.layer_norm_eps, "layernorm_after")(x).astype(self.dtype)
        h = ACTIVATIONS[c.hidden_act](_DenseIn(c.intermediate_size, self.dtype, name="intermediate")(h))
        return x + _DenseIn(c.hidden_size, self.dtype, name="output")(h)


class DPTViTEncoder(nn.Module):
    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """Returns the input and every layer's output."""
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = DPTViTLayer(self.config, self.dtype, name=f"layer_{i}")(x)
            states.append(x)
        return tuple(states)


def _position_embeddings(module: nn.Module, config: DPTConfig, grid: tuple[int, int], dtype):
    """The learned [1, 1 + T, D] position embeddings, the patch part bilinearly resized to `grid`."""
    side = config.image_size // config.patch_size
    pos = module.param(
        "position_embeddings", nn.initializers.normal(0.02), (1, side * side + 1, config.hidden_size), jnp.float32
    )
    pos = pos.astype(jnp.float32)
    patch = resize_bilinear(pos[:, 1:].reshape(1, side, side, -1), grid, align_corners=False)
    return jnp.concatenate([pos[:, :1], patch.reshape(1, grid[0] * grid[1], -1)], axis=1).astype(dtype)


def _with_class_token(module: nn.Module, config: DPTConfig, tokens, grid, dtype):
    cls = module.param("cls_token", nn.initializers.normal(0.02), (1, 1, config.hidden_size), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(dtype), (tokens.shape[0], 1, config.hidden_size))
    return jnp.concatenate([cls, tokens], axis=1) + _position_embeddings(module, config, grid, dtype)


class _PatchEmbeddings(nn.Module):
    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        p = self.config.patch_size
        return nn.Conv(
            self.config.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="projection"
        )(pixel_values)


class DPTViTEmbeddings(nn.Module):
    """Non-overlapping p x p patches -> tokens, with a class token and resized position embeddings."""

    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        """[B, H, W, C] -> ([B, 1 + h*w, D], (h, w), no backbone maps)."""
        x = _PatchEmbeddings(self.config, self.dtype, name="patch_embeddings")(pixel_values.astype(self.dtype))
        b, h, w, d = x.shape
        return _with_class_token(self, self.config, x.reshape(b, h * w, d), (h, w), self.dtype), (h, w), ()


class DPTViTHybridEmbeddings(nn.Module):
    """BiT stages 1-3; the last stage's map, projected 1x1, is the token grid (one token per 16 x 16
    pixels); the first two maps skip the ViT and go straight to the neck."""

    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        _, height, width, _ = pixel_values.shape
        if (height, width) != (c.image_size, c.image_size):
            # As transformers: the hybrid embeddings take only the configured size.
            raise ValueError(f"pixel_values are {height}x{width}; DPT-Hybrid takes {c.image_size}x{c.image_size}")
        maps = BitBackbone(c.backbone_config, self.dtype, name="backbone")(pixel_values.astype(self.dtype))
        x = nn.Conv(c.hidden_size, (1, 1), dtype=self.dtype, name="projection")(maps[-1])
        b, h, w, d = x.shape
        grid = (height // c.patch_size, width // c.patch_size)
        if (h, w) != grid:
            raise ValueError(f"the backbone gives a {h}x{w} map for a {grid[0]}x{grid[1]} patch grid")
        return _with_class_token(self, c, x.reshape(b, h * w, d), grid, self.dtype), grid, maps[:2]


class DPTModel(nn.Module):
    """Embeddings and ViT encoder (transformers' DPTModel without the unused final norm and pooler)."""

    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        embed = DPTViTHybridEmbeddings if self.config.is_hybrid else DPTViTEmbeddings
        x, grid, maps = embed(self.config, self.dtype, name="embeddings")(pixel_values)
        states = DPTViTEncoder(self.config, self.dtype, name="encoder")(x)
        return states, grid, maps


# ---------------------------------------------------------------------------------------------------
# Neck and head


def _conv3x3(features: int, dtype, name: str, use_bias: bool = True, stride: int = 1) -> nn.Conv:
    # PyTorch's padding=1 on both sides, which lax's "SAME" does not give at stride 2 on even sizes.
    return nn.Conv(
        features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=use_bias, dtype=dtype, name=name
    )


class _PatchUpsample(nn.Module):
    """transformers' ConvTranspose2d(C, C, kernel_size=f, stride=f): each token becomes an f x f patch.

    The kernel is stored [f, f, O, I], which is what the generic conv layout makes of PyTorch's
    transposed-conv weight [I, O, f, f]; since the patches do not overlap the layer is one einsum.
    """

    features: int
    factor: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        f = self.factor
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (f, f, self.features, x.shape[-1]), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.einsum("bhwi,acoi->bhawco", x.astype(self.dtype), kernel.astype(self.dtype))
        b, h, _, w, _, o = y.shape
        return y.reshape(b, h * f, w * f, o) + bias.astype(self.dtype)


class DPTReassembleLayer(nn.Module):
    """1x1 projection to the stage's width, then resampling by `factor` (4, 2: up; 1; 0.5: down)."""

    channels: int
    factor: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.channels, (1, 1), dtype=self.dtype, name="projection")(x)
        if self.factor > 1:
            return _PatchUpsample(self.channels, int(self.factor), self.dtype, name="resize")(x)
        if self.factor < 1:
            return _conv3x3(self.channels, self.dtype, "resize", stride=int(1 / self.factor))(x)
        return x


class DPTReassembleStage(nn.Module):
    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, grid):
        """Token sequences [B, 1 + h*w, D] -> maps [B, h*f_i, w*f_i, C_i]; the hybrid model's first two
        inputs are BiT maps already and pass through."""
        c = self.config
        out = []
        for i, x in enumerate(hidden_states):
            if c.is_hybrid and i < 2:
                out.append(x)
                continue
            cls, tokens = x[:, :1], x[:, 1:]
            if c.readout_type == "project":
                readout = jnp.broadcast_to(cls, tokens.shape)
                tokens = nn.Dense(c.hidden_size, dtype=self.dtype, name=f"readout_projects_{i}_0")(
                    jnp.concatenate([tokens, readout], axis=-1)
                )
                tokens = ACTIVATIONS[c.hidden_act](tokens)
            elif c.readout_type == "add":
                tokens = tokens + cls
            b, _, d = tokens.shape
            x = tokens.reshape(b, grid[0], grid[1], d)
            out.append(DPTReassembleLayer(
                c.neck_hidden_sizes[i], c.reassemble_factors[i], self.dtype, name=f"layers_{i}"
            )(x))
        return out


class FrozenBatchNorm(nn.Module):
    """Inference batch norm: (x - running_mean) / sqrt(running_var + eps) * scale + bias.

    The running statistics are constants at inference, so they live in `params` next to the affine
    weights: one param tree carries the whole model and converts with the same rules.
    """

    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("running_mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("running_var", nn.initializers.ones, (c,), jnp.float32)
        mult = scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + self.eps)
        y = (x.astype(jnp.float32) - mean.astype(jnp.float32)) * mult + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class DPTPreActResidualLayer(nn.Module):
    """Residual conv unit: x + conv2(relu(conv1(relu(x)))), optionally with batch norm after each conv."""

    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        bn = c.use_batch_norm_in_fusion_residual
        h = x
        for j in (1, 2):
            conv = _conv3x3(c.fusion_hidden_size, self.dtype, f"convolution{j}", use_bias=c.fusion_use_bias)
            h = conv(jax.nn.relu(h))
            if bn:
                h = FrozenBatchNorm(dtype=self.dtype, name=f"batch_norm{j}")(h)
        return h + x


class DPTFeatureFusionLayer(nn.Module):
    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual=None):
        c = self.config
        if residual is not None:
            if residual.shape != x.shape:
                residual = resize_bilinear(residual, x.shape[1:3], align_corners=False)
            x = x + DPTPreActResidualLayer(c, self.dtype, name="residual_layer1")(residual)
        x = DPTPreActResidualLayer(c, self.dtype, name="residual_layer2")(x)
        x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]), align_corners=True)
        return nn.Conv(c.fusion_hidden_size, (1, 1), dtype=self.dtype, name="projection")(x)


class DPTFeatureFusionStage(nn.Module):
    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features):
        """Fuses coarse to fine; returns the fused maps from the coarsest up (each 2x its input)."""
        fused, out = None, []
        for i, x in enumerate(features[::-1]):
            layer = DPTFeatureFusionLayer(self.config, self.dtype, name=f"layers_{i}")
            fused = layer(x) if fused is None else layer(fused, x)
            out.append(fused)
        return out


class DPTNeck(nn.Module):
    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, grid):
        c = self.config
        maps = DPTReassembleStage(c, self.dtype, name="reassemble_stage")(hidden_states, grid)
        maps = [
            _conv3x3(c.fusion_hidden_size, self.dtype, f"convs_{i}", use_bias=False)(x.astype(self.dtype))
            for i, x in enumerate(maps)
        ]
        return DPTFeatureFusionStage(c, self.dtype, name="fusion_stage")(maps)


class DPTDepthEstimationHead(nn.Module):
    """conv 3x3 (C/2), 2x bilinear upsample (align_corners), conv 3x3 (32), relu, conv 1x1 (1), relu."""

    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, fused):
        c = self.config
        x = fused[c.head_in_index]
        if c.add_projection:
            x = jax.nn.relu(_conv3x3(256, self.dtype, "projection")(x))
        x = _conv3x3(c.fusion_hidden_size // 2, self.dtype, "head_0")(x)
        x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]), align_corners=True)
        x = jax.nn.relu(_conv3x3(32, self.dtype, "head_2")(x))
        x = jax.nn.relu(nn.Conv(1, (1, 1), dtype=self.dtype, name="head_4")(x))
        return x[..., 0]


class DPTForDepthEstimation(nn.Module):
    """transformers' DPTForDepthEstimation (ViT or BiT-hybrid backbone).

    pixel_values: [B, H, W, C] normalised as DPTImageProcessor does. The ViT model takes any H, W that
    the patch size divides (transformers itself only square ones); the hybrid model takes the
    configured image_size.
    """

    config: DPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states: bool = False) -> DPTDepthOutput:
        c = self.config
        if pixel_values.shape[-1] != c.num_channels:
            raise ValueError(f"pixel_values have {pixel_values.shape[-1]} channels; the model takes {c.num_channels}")
        states, grid, maps = DPTModel(c, self.dtype, name="dpt")(pixel_values)
        hidden = list(maps) + [states[1 + i] for i in c.vit_out_layers]
        fused = DPTNeck(c, self.dtype, name="neck")(hidden, grid)
        depth = DPTDepthEstimationHead(c, self.dtype, name="head")(fused)
        return DPTDepthOutput(depth.astype(jnp.float32), states if output_hidden_states else None)


def dummy_inputs(config: DPTConfig, batch: int = 1):
    """Inputs for `init` / `eval_shape`."""
    return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels), jnp.float32),)
