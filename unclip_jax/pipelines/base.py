"""What every pipeline shares: the call skeleton, the checks a call runs before any work, the VAE decode,
batch placement and trimming, and typed inputs.

A call is `prepare` (checks, encoders, initial random draws: host-side work, returning typed inputs and
a static config) then `sample` (pure: inputs -> images, differentiable) then post-processing. A pipeline
class supplies `prepare`, `_sample_placed` (the sampling stages on inputs already placed on the mesh),
`SAMPLE_MODELS` (the models whose params `sample` reads) and its inputs class, whose `BATCH_AXIS` names
the dim of each field's batch rows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax

from unclip_jax.lora import LoraLoaderMixin
from unclip_jax.models import clip, dpt, prior, unet, vae
from unclip_jax.pipelines.checks import check_count
from unclip_jax.pipelines.common import (
    NO_HOOKS,
    HostHooks,
    ImagePipelineOutput,
    check_key,
    check_output_type,
    postprocess,
    sample_key,
    want_progress,
    warn_if_nonfinite,
    with_lora,
)
from unclip_jax.pipelines.loading import PipelineBase
from unclip_jax.sharding import constrain, shard_call
from unclip_jax.textual_inversion import TextualInversionLoaderMixin
from unclip_jax.weights.convert import abstract_params
from unclip_jax.weights.tree import check_tree

# ---------------------------------------------------------------------------------------------------
# Typed inputs


class Inputs:
    """Base of the pipelines' inputs: frozen `flax.struct` dataclasses (pytrees: they go through jit and
    grad whole), changed with `.replace(field=value)`. `BATCH_AXIS`: field -> the dim of its batch rows
    (the other fields are replicated on a mesh)."""

    BATCH_AXIS: ClassVar[dict[str, int]] = {}

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return cls(**d)


def typed_inputs(cls):
    """Makes an `Inputs` subclass a frozen pytree dataclass (every field a pytree leaf or subtree)."""
    return flax.struct.dataclass(cls)


# ---------------------------------------------------------------------------------------------------
# Params checks


def _abstract_inputs(module) -> tuple:
    """Dummy inputs for `module.init` under `jax.eval_shape`."""
    c = module.config
    table = {
        unet.UNet2DConditionModel: unet.dummy_inputs,
        vae.AutoencoderKL: vae.dummy_inputs,
        prior.PriorTransformer: prior.dummy_prior_inputs,
        prior.StableUnCLIPImageNormalizer: prior.dummy_normalizer_inputs,
        clip.CLIPTextModel: clip.dummy_text_inputs,
        clip.CLIPVisionModel: clip.dummy_vision_inputs,
        dpt.DPTForDepthEstimation: dpt.dummy_inputs,
    }
    for cls, make in table.items():
        if isinstance(module, cls):
            return make(c)
    raise TypeError(f"no abstract inputs for a {type(module).__name__}")


# ---------------------------------------------------------------------------------------------------
# The base


class DiffusionPipeline(LoraLoaderMixin, TextualInversionLoaderMixin, PipelineBase):
    """The shared half of the three pipelines (see the module docstring)."""

    SAMPLE_MODELS: tuple[str, ...] = ()
    INPUTS: type = Inputs
    # The jitted methods, for `compiled_cache_sizes`.
    COMPILED: tuple[str, ...] = ("_decode",)

    def __init__(self, **components):
        super().__init__(**components)
        self._abstract: dict[str, tuple[Any, Any]] = {}
        self._states: dict[tuple, Any] = {}

    @property
    def vae_scale_factor(self) -> int:
        self.require("vae")
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def compiled_cache_sizes(self) -> dict[str, int]:
        """Compiled programs held per jitted method (a repeated call with the same static configuration
        adds none)."""
        return {name: getattr(type(self), name)._cache_size() for name in self.COMPILED}

    # ------------------------------------------------------------------ checks before work

    def require(self, *names: str) -> None:
        """A ValueError naming any of these components that the pipeline was built without (None)."""
        missing = [n for n in names if getattr(self, n, None) is None]
        if missing:
            raise ValueError(f"{type(self).__name__} has no {', '.join(missing)} (None), which this call needs; "
                             f"load it, or pass {missing[0]}=... to from_pretrained")

    def check_params(self, params, names) -> None:
        """Checks, before any work, that `params` holds a tree of the right structure and shapes for
        each model component in `names` (against `abstract_params` of the module, the trees loading
        used): a ConversionError (a ValueError) lists missing, unexpected and mis-shaped paths."""
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict component -> param tree; got {type(params).__name__}")
        self.require(*names)
        for name in names:
            module = getattr(self, name)
            if not isinstance(module, nn.Module):
                continue
            if name not in params:
                raise ValueError(f"params has no {name!r} entry (the {name} model's params); it has "
                                 f"{sorted(params)}")
            cached = self._abstract.get(name)
            if cached is None or cached[0] is not module:
                # The same cached trees that loading checked the saved params against.
                cached = self._abstract[name] = (module, abstract_params(module, *_abstract_inputs(module)))
            if not isinstance(params[name], Mapping):
                raise TypeError(f"params[{name!r}] must be a param tree (a dict); got {type(params[name]).__name__}")
            check_tree(params[name], cached[1], f"params[{name!r}]")

    # ------------------------------------------------------------------ shared pieces

    def scheduler_state(self, scheduler, num_inference_steps: int, shape: tuple):
        """`scheduler.set_timesteps(create_state(), steps, shape=shape)`, computed once per scheduler
        configuration, step count and sample shape (prepare and sample of a call share it)."""
        key = (type(scheduler), scheduler.config, num_inference_steps, tuple(shape))
        try:
            hash(key)
        except TypeError:  # a config holding a list: not cached
            key = None
        if key is None or key not in self._states:
            # Concrete values even when `sample` is traced (inside the user's jit or grad): the state is
            # host-built tables, and a cached tracer would leak into later traces.
            with jax.ensure_compile_time_eval():
                state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps, shape=shape)
            if key is None or any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state)):
                return state
            self._states[key] = state
        return self._states[key]

    @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("layout",))
    def _decode(self, params, latents, *, layout=None):
        """Latents [B, h, w, C] -> the VAE output [B, H, W, 3] (about [-1, 1])."""
        scale = self.vae.config.scaling_factor
        return constrain(layout, self.vae.apply({"params": params["vae"]}, latents / scale, method="decode"))

    def _decode_checked(self, params, latents, config, layout):
        """What `sample` returns after the last loop: latents, or the VAE output (warned about when it
        is not finite where the latents were)."""
        if config.output_type == "latent":
            return latents
        images = self._decode(params, latents, layout=layout)
        warn_if_nonfinite(images, "VAE decoder", given=latents)
        return images

    def _sample_placed(self, params, inputs, key, config, layout, hooks: HostHooks):
        """The sampling stages on placed inputs (per pipeline)."""
        raise NotImplementedError

    def _sample(self, params, inputs, key, config, mesh=None, hooks: HostHooks = NO_HOOKS):
        """Places params and inputs on the mesh (padding the batch), samples, trims the padding."""
        if not isinstance(inputs, self.INPUTS):
            raise TypeError(f"inputs must be the {self.INPUTS.__name__} that `prepare` returns (change fields with "
                            f".replace(name=value)); got {type(inputs).__name__}")
        batch = inputs.batch_size
        layout, params, placed = shard_call(mesh, params, self.SAMPLE_MODELS, inputs.as_dict(), inputs.BATCH_AXIS,
                                            batch)
        out = self._sample_placed(params, type(inputs).from_dict(placed), key, config, layout, hooks)
        return out if out.shape[0] == batch else out[:batch]

    def sample(self, params, inputs, key: jax.Array, *, config, mesh=None):
        """inputs (see `prepare`) -> the VAE output [B, H, W, 3] (about [-1, 1], unclipped), or the final
        latents [B, h, w, C] for `config.output_type == "latent"`. Pure and differentiable (with respect to
        the inputs' arrays and params); `key` draws only the schedulers' per-step noise. On a `mesh` the
        batch is split over it (see `sharding`); any batch size works (padded, then trimmed)."""
        return self._sample(params, inputs, key, config, mesh)

    def _call(self, args, kwargs, *, params, key, mesh, output_type, return_dict, cross_attention_kwargs,
              hooks: HostHooks):
        """What `__call__` does: checks, prepare, sample (with the host hooks), post-process."""
        check_output_type(output_type)
        check_count(hooks.callback_steps, "callback_steps")
        if key is not None:
            check_key(key)
        params = with_lora(params, cross_attention_kwargs)
        inputs, config = self.prepare(*args, params=params, key=key, **kwargs)
        if output_type == "latent":
            config = dataclasses.replace(config, output_type="latent")
        images = self._sample(params, inputs, sample_key(key), config, mesh, hooks)
        images = postprocess(images, output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)


def host_hooks(callback=None, callback_steps: int = 1, on_step_end=None, tensor_inputs=("latents",),
               progress_bar: bool | None = None) -> HostHooks:
    """The HostHooks of a call's arguments."""
    return HostHooks(callback=callback, callback_steps=callback_steps, on_step_end=on_step_end,
                     tensor_inputs=tuple(tensor_inputs or ()), progress=want_progress(progress_bar))
