"""Linear multistep in sigma (k-diffusion's `sample_lms`), as diffusers' LMSDiscreteScheduler.

x_{i+1} = x_i + sum_j c_{ij} d_{i-j}, where d are past ODE derivatives and c_{ij} integrates the Lagrange
basis polynomial of node sigma_{i-j} over [sigma_i, sigma_{i+1}]. diffusers integrates numerically at every
step (scipy quad); the integrand is a polynomial, so here the coefficients are integrated exactly on the
host at `set_timesteps` and kept in the state, one table per multistep order.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common

MAX_ORDER = 4


def _basis_integrals(nodes: np.ndarray, j: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Integral over [lo, hi] of the Lagrange basis polynomial of node j, for a batch of node sets
    (float64 [m, e] -> [m]). The variable is shifted to start at `lo` so nothing cancels."""
    m, e = nodes.shape
    shifted = nodes - lo[:, None]
    poly = np.ones((m, 1))  # ascending monomial coefficients in (tau - lo)
    for k in range(e):
        if k == j:
            continue
        grown = np.zeros((m, poly.shape[1] + 1))
        grown[:, 1:] += poly
        grown[:, :-1] -= shifted[:, k : k + 1] * poly
        poly = grown / (nodes[:, j] - nodes[:, k])[:, None]
    powers = np.arange(1, poly.shape[1] + 1)
    return np.sum(poly / powers * (hi - lo)[:, None] ** powers, axis=1)


def lms_coefficients(sigmas: np.ndarray, max_order: int = MAX_ORDER) -> np.ndarray:
    """c[o - 1, i, j] for multistep order o, step i and history offset j (float32 [max_order, n, max_order]):
    the integral over [sigma_i, sigma_{i+1}] of the Lagrange basis of node sigma_{i-j} on the nodes
    sigma_i, ..., sigma_{i-e+1} with e = min(i + 1, o); zero where j >= e."""
    s = np.asarray(sigmas, np.float64)
    n = len(s) - 1
    out = np.zeros((max_order, n, max_order), np.float64)
    for o in range(1, max_order + 1):
        for e in range(1, o + 1):
            # Steps whose effective order is e: just step e - 1 while warming up, all later ones at e = o.
            steps = np.arange(e - 1, n) if e == o else np.arange(e - 1, min(e, n))
            if steps.size == 0:
                continue
            nodes = s[steps[:, None] - np.arange(e)[None, :]]
            for j in range(e):
                out[o - 1, steps, j] = _basis_integrals(nodes, j, s[steps], s[steps + 1])
    return out.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LMSDiscreteConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self):
        common.check_unsupported(self, "LMSDiscrete")


@flax.struct.dataclass
class LMSDiscreteState:
    alphas_cumprod: jax.Array  # [T] float32
    timesteps: jax.Array  # [n] float32
    sigmas: jax.Array  # [n + 1] float32
    coefficients: jax.Array  # [MAX_ORDER, n, MAX_ORDER] float32, see `lms_coefficients`
    derivatives: jax.Array  # [MAX_ORDER, ...] float32, newest last
    num_derivatives: jax.Array  # [] int32
    step_index: jax.Array  # [] int32, -1 before the first step
    begin_index: jax.Array  # [] int32, -1 unless set
    init_noise_sigma: jax.Array  # []


@dataclasses.dataclass(frozen=True)
class LMSDiscreteScheduler(common.Scheduler):
    config: LMSDiscreteConfig = LMSDiscreteConfig()
    order: ClassVar[int] = 1

    def create_state(self, shape=None) -> LMSDiscreteState:
        """The training-length schedule (diffusers runs set_timesteps(T) at construction)."""
        return self.set_timesteps(None, self.config.num_train_timesteps, shape)

    def set_timesteps(self, state: LMSDiscreteState | None, num_inference_steps: int, shape=None) -> LMSDiscreteState:
        """`shape` (the sample's) fixes the derivative history's shape, as a compiled loop needs."""
        common.check_num_inference_steps(self.config, num_inference_steps, "LMSDiscreteScheduler")
        ac = common.train_alphas_cumprod(self.config)
        ts, sigmas, _ = common.discrete_sigmas(self.config, ac, num_inference_steps)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return LMSDiscreteState(
            alphas_cumprod=jnp.asarray(ac),
            timesteps=jnp.asarray(np.asarray(ts).astype(np.float32)),
            sigmas=jnp.asarray(sigmas),
            coefficients=jnp.asarray(lms_coefficients(sigmas)),
            derivatives=jnp.zeros(common.history_shape(MAX_ORDER, shape), jnp.float32),
            num_derivatives=jnp.asarray(0, jnp.int32),
            step_index=jnp.asarray(-1, jnp.int32),
            begin_index=jnp.asarray(-1, jnp.int32),
            init_noise_sigma=jnp.asarray(common.init_noise_sigma_of(sigmas, self.config.timestep_spacing)),
        )

    def scale_model_input(self, state: LMSDiscreteState, sample: jax.Array, timestep) -> jax.Array:
        return common.scale_by_sigma(sample, state.sigmas[common.current_step_index(state, timestep)])

    def step(
        self,
        state: LMSDiscreteState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
        order: int = 4,
    ) -> common.SchedulerOutput:
        """One LMS step of (static) `order` <= 4, lower while fewer derivatives exist (deterministic)."""
        if not 1 <= order <= MAX_ORDER:
            raise ValueError(f"LMS order must be in 1..{MAX_ORDER}, got {order}")
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        i = common.current_step_index(state, timestep)
        sigma = state.sigmas[i]
        x0 = common.denoised(self.config.prediction_type, out, x, sigma)
        history = common.push(common.history_for(state.derivatives, x), (x - x0) / sigma)
        count = jnp.minimum(state.num_derivatives + 1, order)
        coeffs = state.coefficients[order - 1, i]
        # A history shorter than the order (a start past step 0) uses only the newest derivatives.
        update = 0.0
        for j in range(order):
            update = update + jnp.where(j < count, coeffs[j], 0.0) * history[-1 - j]
        prev = x + update
        new_state = state.replace(derivatives=history, num_derivatives=count, step_index=i + 1)
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=new_state,
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state: LMSDiscreteState, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        return common.add_sigma_noise(state, original, noise, timesteps)
