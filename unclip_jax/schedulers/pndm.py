"""Pseudo numerical methods (PNDM, Liu et al. 2022), as diffusers' PNDMScheduler: three Runge-Kutta (PRK)
warm-up steps of four model calls each, then linear multistep (PLMS) updates; or PLMS alone with
`skip_prk_steps` (lower-order Adams-Bashforth at the start, as Stable Diffusion configs use).

The history lives in fixed-shape arrays, so `step` is branch-free: both the PRK and the PLMS update are
computed and the counter picks one.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common


@dataclasses.dataclass(frozen=True)
class PNDMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise common.SchedulerConfigError(f"PNDM: prediction_type {self.prediction_type!r} is not supported")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2") and self.trained_betas is None:
            raise common.SchedulerConfigError(f"PNDM: beta_schedule {self.beta_schedule!r} is not supported")
        if self.timestep_spacing not in ("linspace", "leading", "trailing"):
            raise common.SchedulerConfigError(f"PNDM: timestep_spacing {self.timestep_spacing!r} is not supported")


@flax.struct.dataclass
class PNDMState:
    alphas_cumprod: jax.Array  # [T] float32
    final_alpha_cumprod: jax.Array  # []
    timesteps: jax.Array  # [n_prk + n_plms] int32: the PRK timesteps first
    step_ratio: jax.Array  # [] int32, T // n
    num_prk_steps: jax.Array  # [] int32
    counter: jax.Array  # [] int32, steps taken
    ets: jax.Array  # [4, ...] float32: past model outputs, newest last
    num_ets: jax.Array  # [] int32, how many of `ets` are filled
    carry: jax.Array  # [2, ...] float32: (running RK sum of model outputs, sample at the start of the RK step)
    init_noise_sigma: jax.Array  # []


@dataclasses.dataclass(frozen=True)
class PNDMScheduler(common.Scheduler):
    config: PNDMConfig = PNDMConfig()
    order: ClassVar[int] = 1

    def create_state(self, shape=None) -> PNDMState:
        c = self.config
        ac = common.train_alphas_cumprod(c)
        return PNDMState(
            alphas_cumprod=jnp.asarray(ac),
            final_alpha_cumprod=jnp.asarray(1.0 if c.set_alpha_to_one else ac[0], jnp.float32),
            timesteps=jnp.zeros((0,), jnp.int32),
            step_ratio=jnp.asarray(1, jnp.int32),
            num_prk_steps=jnp.asarray(0, jnp.int32),
            counter=jnp.asarray(0, jnp.int32),
            ets=jnp.zeros(common.history_shape(4, shape), jnp.float32),
            num_ets=jnp.asarray(0, jnp.int32),
            carry=jnp.zeros(common.history_shape(2, shape), jnp.float32),
            init_noise_sigma=jnp.asarray(1.0, jnp.float32),
        )

    def set_timesteps(self, state: PNDMState, num_inference_steps: int, shape=None) -> PNDMState:
        """`shape` is the sample's shape: give it to run `step` inside a compiled loop (the history
        buffers must have a fixed shape); without it they are shaped at the first step."""
        common.check_num_inference_steps(self.config, num_inference_steps, "PNDMScheduler")
        c = self.config
        n, T = num_inference_steps, c.num_train_timesteps
        # PNDM builds on ascending timesteps; the spacings are those of DDIM reversed.
        base = common.inference_timesteps(c.timestep_spacing, T, n, c.steps_offset)[::-1].astype(np.int64)
        if c.skip_prk_steps:
            prk = np.zeros((0,), np.int64)
            # The first PLMS step is repeated: its second call is the pseudo-improved-Euler correction.
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            if n < 4:
                raise ValueError("PNDM with PRK steps needs num_inference_steps >= 4 (diffusers fails below)")
            # Each of the last three intervals is run as RK4 with half steps: t, t - r/2, t - r/2, t - r.
            half = T // n // 2
            prk = np.repeat(base[-4:], 2) + np.tile(np.array([0, half]), 4)
            prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
            plms = base[:-3][::-1]
        ts = np.concatenate([prk, plms]).astype(np.int64)
        return state.replace(
            timesteps=jnp.asarray(ts, jnp.int32),
            step_ratio=jnp.asarray(T // n, jnp.int32),
            num_prk_steps=jnp.asarray(len(prk), jnp.int32),
            counter=jnp.asarray(0, jnp.int32),
            ets=jnp.zeros(common.history_shape(4, shape), jnp.float32),
            num_ets=jnp.asarray(0, jnp.int32),
            carry=jnp.zeros(common.history_shape(2, shape), jnp.float32),
        )

    def set_begin_index(self, state: PNDMState, begin_index: int = 0) -> PNDMState:
        """A no-op: PNDM starts its multistep history afresh wherever the loop starts, as diffusers does."""
        return state

    def scale_model_input(self, state: PNDMState, sample: jax.Array, timestep=None) -> jax.Array:
        return sample

    def _prev_sample(self, state: PNDMState, x, t, prev_t, eps):
        """The transfer x_t -> x_prev of PNDM for a given noise estimate (Liu et al. 2022, eq. 11)."""
        abar_t = state.alphas_cumprod[t]
        abar_prev = jnp.where(prev_t >= 0, state.alphas_cumprod[jnp.maximum(prev_t, 0)], state.final_alpha_cumprod)
        if self.config.prediction_type == "v_prediction":
            eps = jnp.sqrt(abar_t) * eps + jnp.sqrt(1 - abar_t) * x
        denom = abar_t * jnp.sqrt(1 - abar_prev) + jnp.sqrt(abar_t * (1 - abar_t) * abar_prev)
        return jnp.sqrt(abar_prev / abar_t) * x - (abar_prev - abar_t) * eps / denom

    def step(
        self,
        state: PNDMState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> common.SchedulerOutput:
        """One PRK or PLMS call, picked by the step counter (deterministic: `key`/`noise` are unused)."""
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        ets = common.history_for(state.ets, x)
        carry = common.history_for(state.carry, x)
        rk_sum, rk_sample = carry[0], carry[1]
        t = jnp.asarray(timestep, jnp.int32)
        c = state.counter
        r = state.step_ratio

        # PRK: the four calls of one RK4 step accumulate (1, 2, 2, 1) / 6 weights of the model output.
        m = c % 4
        prk_t = state.timesteps[jnp.clip(c // 4 * 4, 0, max(state.timesteps.shape[0] - 1, 0))]
        prk_prev_t = t - jnp.where(c % 2 == 1, 0, r // 2)
        prk_eps = jnp.where(m == 3, rk_sum + out / 6, out)
        prk_sum = jnp.where(m == 0, rk_sum + out / 6, jnp.where(m == 3, 0.0, rk_sum + out / 3))
        prk_start = jnp.where(m == 0, x, rk_sample)
        prk_ets = jnp.where(m == 0, common.push(ets, out), ets)
        prk_num = jnp.where(m == 0, jnp.minimum(state.num_ets + 1, 4), state.num_ets)
        prk_prev = self._prev_sample(state, prk_start, prk_t, prk_prev_t, prk_eps)

        # PLMS: Adams-Bashforth on the stored outputs; the counter-1 call corrects the first step.
        second = c == 1
        plms_ets = jnp.where(second, ets, common.push(ets, out))
        plms_num = jnp.where(second, state.num_ets, jnp.minimum(state.num_ets + 1, 4))
        plms_t = jnp.where(second, t + r, t)
        plms_prev_t = jnp.where(second, t, t - r)
        e1, e2, e3, e4 = plms_ets[-1], plms_ets[-2], plms_ets[-3], plms_ets[-4]
        plms_eps = jnp.where(
            plms_num == 1,
            jnp.where(second, (out + ets[-1]) / 2, out),
            jnp.where(plms_num == 2, (3 * e1 - e2) / 2,
                      jnp.where(plms_num == 3, (23 * e1 - 16 * e2 + 5 * e3) / 12,
                                (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4) / 24)))
        first = (plms_num == 1) & (c == 0)
        plms_x = jnp.where((plms_num == 1) & second, rk_sample, x)
        plms_start = jnp.where(first, x, rk_sample)
        plms_prev = self._prev_sample(state, plms_x, plms_t, plms_prev_t, plms_eps)

        in_prk = (c < state.num_prk_steps) & (not self.config.skip_prk_steps)
        prev = jnp.where(in_prk, prk_prev, plms_prev)
        new_state = state.replace(
            counter=c + 1,
            ets=jnp.where(in_prk, prk_ets, plms_ets),
            num_ets=jnp.where(in_prk, prk_num, plms_num),
            carry=jnp.stack([jnp.where(in_prk, prk_sum, rk_sum), jnp.where(in_prk, prk_start, plms_start)]),
        )
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=new_state)

    def add_noise(self, state: PNDMState, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        return common.add_noise(state.alphas_cumprod, original, noise, timesteps)
