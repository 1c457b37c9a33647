"""The LoRA objective: low-rank adapters (Hu et al. 2021) on the UNet's attention projections (and
optionally the text encoder's), trained with the pipeline's own denoising objective over a frozen base,
as diffusers' train_text_to_image_lora does.

The adapter lives in the params as `unclip_jax.lora` keeps loaded adapters (`params["lora"]`, one adapter
named `ADAPTER`, active with weight 1, unfused), so the pipelines sample with it unchanged and
`save_lora_weights` writes it in the diffusers/peft format that diffusers' `load_lora_weights` reads.
Layers: the UNet's to_q, to_k, to_v and to_out.0 (the script's targets) and, with `lora_text_encoder`, the
text encoder's q_proj, k_proj, v_proj and out_proj. Initialisation as peft's "gaussian": A ~ N(0, 1/r),
B = 0; scale lora_alpha / r (lora_alpha defaults to the rank, as in the script). Only A and B are
trained.

The loss is the base objective's (decoder for StableUnCLIPImg2ImgPipeline, depth for
StableDiffusionDepth2ImgPipeline, with the same options) on the params with the adapter merged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from unclip_jax import lora as L
from unclip_jax.training.objectives.params import make_split, merge

ADAPTER = "default_0"  # the name diffusers gives the first adapter it loads
TARGETS = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj")}


def lora_layers(component: str, base_params, rank: int, alpha: float, key: jax.Array) -> dict:
    """{torch_module: {"A", "B", "scale"}} on every TARGETS[component] Dense kernel of `base_params`."""
    flat = traverse_util.flatten_dict(base_params)
    kernels = [p for p in flat if p[-1] == "kernel" and flat[p].ndim == 2]
    layers = {}
    for i, path in enumerate(sorted(kernels)):
        module = L._torch_name(path[:-1])
        if not any(module == t or module.endswith("." + t) for t in TARGETS[component]):
            continue
        assert L._target(component, module) == path, (module, path)  # the loader finds the same kernel
        fan_in, fan_out = flat[path].shape
        a = jax.random.normal(jax.random.fold_in(key, i), (rank, fan_in), jnp.float32) / rank
        layers[module] = {"A": a, "B": jnp.zeros((fan_out, rank), jnp.float32), "scale": np.float32(alpha / rank)}
    if not layers:
        raise ValueError(f"the {component} has no {', '.join(TARGETS[component])} layers for LoRA")
    return layers


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a jit closure's constant
class LoraLoss:
    """The base objective's loss on the params with the adapter merged (`draw` and `given` as the base's)."""

    base: Any

    def draw(self, key, batch):
        return self.base.draw(key, batch)

    def given(self, trainable, frozen, batch, draws):
        return self.base.given(L.lora_params(merge(trainable, frozen)), {}, batch, draws)

    def __call__(self, trainable, frozen, batch, key):
        return self.given(trainable, frozen, batch, self.draw(key, batch))


def base_objective(pipe, what: str):
    """The objective module (decoder or depth) of `pipe`'s UNet, whose loss LoRA and textual inversion train
    through; TypeError for another pipeline (`what`: the objective's phrase for the error)."""
    from unclip_jax.pipelines.depth2img import StableDiffusionDepth2ImgPipeline  # noqa: PLC0415
    from unclip_jax.pipelines.stable_unclip import StableUnCLIPImg2ImgPipeline  # noqa: PLC0415
    from unclip_jax.training.objectives import decoder, depth  # noqa: PLC0415

    bases = {StableUnCLIPImg2ImgPipeline: decoder, StableDiffusionDepth2ImgPipeline: depth}
    if type(pipe) not in bases:
        raise TypeError(f"{what} of a StableUnCLIPImg2ImgPipeline (the Stable unCLIP decoder, with its image "
                        f"encoder) or a StableDiffusionDepth2ImgPipeline; got {type(pipe).__name__}")
    return bases[type(pipe)]


def build(pipe, params, options: dict):
    """LoRA on a StableUnCLIPImg2ImgPipeline or StableDiffusionDepth2ImgPipeline (see the module docstring).

    options: lora_rank (4), lora_alpha (the rank), lora_text_encoder (False), seed (0: the adapter's
    initial draw), and the base objective's."""
    base_module = base_objective(pipe, "LoRA trains the UNet")
    if L.LORA in params:
        raise ValueError("the params already hold LoRA adapters: fuse or unload them before training a new one")
    rank = int(options.get("lora_rank", 4))
    if rank < 1:
        raise ValueError(f"lora_rank must be a positive integer; got {options.get('lora_rank')!r}")
    alpha = float(options.get("lora_alpha") or rank)
    components = ("unet", "text_encoder") if options.get("lora_text_encoder") else ("unet",)
    key = jax.random.key(int(options.get("seed", 0)))
    adapter = {c: lora_layers(c, params[c], rank, alpha, jax.random.fold_in(key, n)) for n, c in enumerate(components)}
    params = {**params, L.LORA: {"adapters": {ADAPTER: adapter},
                                 "active": {ADAPTER: {c: np.float32(1.0) for c in components}}, "fused": {}}}
    base, pipe, params = base_module.build(pipe, params, options)
    split, merge_ = make_split([f"{L.LORA}/adapters/{ADAPTER}"], leaves=("A", "B"))

    def save(out_dir: str, pipe_, params_) -> None:
        """The base pipeline folder, and the adapter beside it as pytorch_lora_weights.safetensors."""
        pipe_.save_pretrained(out_dir, L.unload_lora_weights(params_))
        L.save_lora_weights(out_dir, params_, adapter_name=ADAPTER)

    objective = dataclasses.replace(base, name="lora", split=split, merge=merge_, loss=LoraLoss(base.loss),
                                    save=save)
    return objective, pipe, params


__all__ = ["ADAPTER", "LoraLoss", "TARGETS", "base_objective", "build", "lora_layers"]
