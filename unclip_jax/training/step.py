"""The train step: one jit-compiled function `(state, frozen, batch) -> (state, metrics)` generic over an
`Objective`, laid out on a `unclip_jax.sharding` mesh.

What it computes, with diffusers' training scripts' defaults (train_text_to_image.py):

- AdamW (beta1 0.9, beta2 0.999, weight decay 1e-2, eps 1e-8) on the fp32 master copy of the trainable
  params, after clipping the gradient to a global norm (1.0) as torch's `clip_grad_norm_` does (scale by
  `max_norm / (norm + 1e-6)` when that is below 1);
- a learning rate schedule with warm-up, diffusers' `get_scheduler` names: constant (no warm-up),
  constant_with_warmup, linear, cosine (half a cosine down to 0 at `steps`);
- gradient accumulation: a batch of `accumulation * B` rows is `accumulation` micro-batches of B, scanned
  (`lax.scan`) with their gradients averaged, then one optimizer update: one call, one optimizer step;
- an EMA of the trainable params with diffusers' `EMAModel` decay: `min(decay, (1 + s) / (10 + s))`, or
  with warm-up `1 - (1 + s / inv_gamma) ** -power`, floored at `min_decay`, where s is the optimizer step
  less `update_after_step` less 1 (decay 0, a copy, while s <= 0);
- mixed precision: with `mixed_precision="bf16"` the trainable params are cast to bfloat16 inside the
  differentiated function (the frozen ones once, before the loop), so the gradients, the master params
  and the optimizer state stay float32.

Each step's randomness is `fold_in(key, step)` of the run's key (and `fold_in(that, i)` for micro-batch i),
so a resumed run draws what the uninterrupted one drew.

Sharding: the batch's rows are split over the mesh's batch axes; params, optimizer state and EMA are
replicated, or FSDP-sharded over an `fsdp` axis by the same rule as sampling (`Layout.param`). Several
hosts: call `jax.distributed.initialize()` first in every process (see `unclip_jax.sharding`), build the
mesh over all devices and give each process's rows of the global batch (`Layout.process_rows`,
`Layout.put_rows`); the program is the same one a single process runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from unclip_jax.sharding import Layout
from unclip_jax.training.objective import Objective

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISION = {"no": jnp.float32, "bf16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The optimizer, schedule, EMA and precision of a run (diffusers' defaults)."""

    steps: int
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1
    ema_decay: float | None = 0.9999  # None or 0: no EMA
    ema_min_decay: float = 0.0
    ema_update_after_step: int = 0
    ema_warmup: bool = False
    ema_inv_gamma: float = 1.0
    ema_power: float = 2 / 3
    mixed_precision: str = "no"

    def __post_init__(self):
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"--lr-scheduler {self.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed-precision {self.mixed_precision!r}: choose one of {', '.join(MIXED_PRECISION)}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("--gradient-accumulation-steps must be at least 1")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1); got {self.ema_decay}")

    @property
    def use_ema(self) -> bool:
        return bool(self.ema_decay)

    @property
    def compute_dtype(self):
        return MIXED_PRECISION[self.mixed_precision]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `ema` is None without an EMA; `key` is the run's key as raw key data."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    trainable: Any
    opt_state: Any
    ema: Any
    key: jax.Array


# ---------------------------------------------------------------------------------------------- pieces


def lr_schedule(config: StepConfig) -> Callable[[jax.Array], jax.Array]:
    """step (0-based, before the update) -> learning rate, as diffusers' `get_scheduler` lambdas."""
    base, warm, total = config.learning_rate, config.lr_warmup_steps, config.steps
    name = config.lr_scheduler

    def schedule(count):
        c = jnp.asarray(count, jnp.float32)
        if name == "constant":
            return jnp.full((), base, jnp.float32)
        ramp = c / max(1.0, float(warm))
        if name == "constant_with_warmup":
            after = jnp.ones((), jnp.float32)
        elif name == "linear":
            after = jnp.maximum(0.0, (total - c) / max(1.0, float(total - warm)))
        else:  # cosine, half a period (num_cycles 0.5)
            progress = (c - warm) / max(1.0, float(total - warm))
            after = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * 2.0 * 0.5 * progress)))
        return base * jnp.where(c < warm, ramp, after)

    return schedule


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: grads times min(1, max_norm / (norm + 1e-6))."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: StepConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(config), b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_epsilon,
                        weight_decay=config.adam_weight_decay)
    if config.max_grad_norm:
        return optax.chain(clip_by_global_norm_torch(config.max_grad_norm), adamw)
    return adamw


def ema_decay(config: StepConfig, step: jax.Array) -> jax.Array:
    """diffusers' `EMAModel.get_decay(optimization_step)`; `step` counts optimizer steps, this one included."""
    s = jnp.maximum(0, step - config.ema_update_after_step - 1).astype(jnp.float32)
    if config.ema_warmup:
        cur = 1.0 - (1.0 + s / config.ema_inv_gamma) ** -config.ema_power
    else:
        cur = (1.0 + s) / (10.0 + s)
    cur = jnp.maximum(jnp.minimum(cur, config.ema_decay), config.ema_min_decay)
    return jnp.where(s <= 0, 0.0, cur)


def ema_update(config: StepConfig, ema, params, step: jax.Array):
    """One EMAModel.step: ema <- ema - (1 - decay) * (ema - params)."""
    one_minus = 1.0 - ema_decay(config, step)
    return jax.tree.map(lambda e, p: e - (one_minus * (e - p)).astype(e.dtype), ema, params)


def cast_floating(tree, dtype):
    """Floating leaves of `tree` as `dtype` (the rest as they are)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def init_state(config: StepConfig, trainable, seed: int) -> TrainState:
    """The state before the first step: fp32 master params, fresh optimizer state, EMA = params."""
    trainable = cast_floating(trainable, jnp.float32)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                      opt_state=make_optimizer(config).init(trainable),
                      ema=jax.tree.map(jnp.copy, trainable) if config.use_ema else None,
                      key=jax.random.key_data(jax.random.key(seed)))


# ---------------------------------------------------------------------------------------------- step


def train_step(objective: Objective, config: StepConfig, state: TrainState, frozen, batch):
    """One optimizer step (not compiled; `compile_step` jits it). Returns (state, metrics)."""
    tx = make_optimizer(config)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    dtype, accum = config.compute_dtype, config.gradient_accumulation_steps

    def loss_fn(trainable, micro, k):
        loss, metrics = objective.loss(cast_floating(trainable, dtype), frozen, micro, k)
        return loss.astype(jnp.float32), {n: jnp.asarray(v, jnp.float32) for n, v in metrics.items()}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss, metrics), grads = grad_fn(state.trainable, batch, key)
    else:
        # Rows b*accum + i form micro-batch i, so each device's rows stay on it.
        def split(x):
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
            return jnp.moveaxis(x, 1, 0)

        micro = jax.tree.map(split, batch)
        zeros = jax.tree.map(jnp.zeros_like, state.trainable)

        def body(acc, xs):
            i, mb = xs
            (loss, metrics), g = grad_fn(state.trainable, mb, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, acc, g), (loss, metrics)

        grads, (losses, metrics) = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        grads = jax.tree.map(lambda g: g / accum, grads)
        loss, metrics = losses.mean(), jax.tree.map(jnp.mean, metrics)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    step = state.step + 1
    ema = ema_update(config, state.ema, trainable, step) if config.use_ema else None
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(config)(state.step)}
    return state.replace(step=step, trainable=trainable, opt_state=opt_state, ema=ema), metrics


def state_shardings(layout: Layout, state):
    """Per leaf: `Layout.param` by shape (replicated, or FSDP over `fsdp`; scalars replicated)."""
    return jax.tree.map(lambda x: layout.param(tuple(jnp.shape(x))), state)


def compile_step(objective: Objective, config: StepConfig, layout: Layout, state, frozen, batch):
    """`train_step` jitted with in/out shardings for these (abstract or concrete) state, frozen and batch
    trees; the state is donated."""
    state_sh = state_shardings(layout, state)
    frozen_sh = state_shardings(layout, frozen)
    batch_sh = jax.tree.map(lambda x: layout.batch(), batch)

    def step(s, f, b):
        return train_step(objective, config, s, f, b)

    return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, layout.replicated()), donate_argnums=(0,))


def check_batch(layout: Layout, config: StepConfig, batch_size: int) -> None:
    """A batch the mesh (and the accumulation) can split, before anything is loaded."""
    if batch_size % layout.batch_devices:
        processes = jax.process_count()
        where = f" ({processes} processes with {len(jax.local_devices())} each)" if processes > 1 else ""
        raise ValueError(f"--batch-size {batch_size} is not divisible by the {layout.batch_devices} devices the "
                         f"batch is split over{where}")
