"""DEIS multistep sampling (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential
integrator", arXiv:2204.13902), the counterpart of diffusers' `DEISMultistepScheduler`.

The log-rho variant: the noise prediction is extrapolated by a Lagrange polynomial in log(rho),
rho = sigma_t / alpha_t, through the last 1-3 outputs, and the exponential integrator integrates it exactly.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common


@dataclasses.dataclass(frozen=True)
class DEISMultistepConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "deis"
    solver_type: str = "logrho"
    lower_order_final: bool = True
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    def __post_init__(self):
        # diffusers loads a DPM-Solver or UniPC config as DEIS log-rho.
        if self.algorithm_type in ("dpmsolver", "dpmsolver++"):
            object.__setattr__(self, "algorithm_type", "deis")
        if self.solver_type in ("midpoint", "heun", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "logrho")
        if self.algorithm_type != "deis":
            raise common.SchedulerConfigError(f"algorithm_type {self.algorithm_type!r} is not supported")
        if self.solver_type != "logrho":
            raise common.SchedulerConfigError(f"solver_type {self.solver_type!r} is not supported")
        if self.solver_order not in (1, 2, 3):
            raise common.SchedulerConfigError(f"solver_order {self.solver_order} is not supported (1, 2 or 3)")
        common.check_unsupported(self, "DEISMultistepScheduler")


DEISMultistepState = common.MultistepState


def _lagrange_integral_2(t, b, c):
    """Antiderivative in rho of the Lagrange basis polynomial (in log rho) that is 1 at b and 0 at c."""
    return t * (-jnp.log(c) + jnp.log(t) - 1) / (jnp.log(b) - jnp.log(c))


def _lagrange_integral_3(t, b, c, d):
    """Antiderivative in rho of the quadratic Lagrange basis (in log rho) that is 1 at b, 0 at c and d."""
    lt, lc, ld = jnp.log(t), jnp.log(c), jnp.log(d)
    num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return num / ((jnp.log(b) - lc) * (jnp.log(b) - ld))


@dataclasses.dataclass(frozen=True)
class DEISMultistepScheduler(common.Scheduler):
    config: DEISMultistepConfig = DEISMultistepConfig()

    order = 1

    def _state(self, timesteps, sigmas, shape) -> DEISMultistepState:
        ac = common.train_alphas_cumprod(self.config)
        return common.multistep_state(timesteps, sigmas, ac, self.config.solver_order, shape)

    def create_state(self, shape=None) -> DEISMultistepState:
        ac = common.train_alphas_cumprod(self.config)
        t = self.config.num_train_timesteps
        return self._state(np.arange(t - 1, -1, -1), common.train_sigmas(ac), shape)

    def schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps int64 [N], sigmas float32 [N + 1]) as diffusers' `set_timesteps` builds them."""
        cfg, n = self.config, num_inference_steps
        ac = common.train_alphas_cumprod(cfg)
        timesteps = common.spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
        sig = common.train_sigmas(ac)
        log_sig = np.log(sig)
        kind = common.sigma_kind(cfg)
        if kind is not None:
            sigmas = common.respaced_sigmas(kind, np.flip(sig), n)
            timesteps = common.sigma_to_t(sigmas, log_sig)
            if kind == "karras":
                timesteps = timesteps.round()
            # The last step ends where it starts (h = 0): DEIS never steps to sigma = 0.
            sigmas = np.concatenate([sigmas, sigmas[-1:]])
        else:
            sigmas = np.interp(timesteps, np.arange(len(sig)), sig)
            sigmas = np.concatenate([sigmas, [((1 - ac[0]) / ac[0]) ** 0.5]])
        return np.asarray(timesteps).astype(np.int64), sigmas.astype(np.float32)

    def set_timesteps(self, state, num_inference_steps: int, shape=None) -> DEISMultistepState:
        """`shape`: the sample shape, which sizes the output history (see DPMSolverMultistepScheduler)."""
        common.check_num_inference_steps(self.config, num_inference_steps, "DEISMultistepScheduler")
        timesteps, sigmas = self.schedule(num_inference_steps)
        return self._state(timesteps, sigmas, shape)

    def scale_model_input(self, state, sample, timestep=None):
        return sample

    def step(self, state, model_output, timestep, sample, *, key=None, noise=None) -> common.SchedulerOutput:
        cfg = self.config
        n = state.timesteps.shape[0]
        i = common.current_step_index(state, timestep)
        sig = lambda k: common.sigma_at(state.sigmas, k)  # noqa: E731
        a_t, s_t = common.alpha_sigma(sig(i + 1))
        a0, s0 = common.alpha_sigma(sig(i))
        a1, s1 = common.alpha_sigma(sig(i - 1))
        a2, s2 = common.alpha_sigma(sig(i - 2))
        x = sample.astype(jnp.float32)
        x0 = common.data_prediction(cfg.prediction_type, model_output.astype(jnp.float32), x, a0, s0)
        if cfg.thresholding:
            x0 = common.threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        eps = (x - a0 * x0) / s0
        history = common.push(common.history_for(state.model_outputs, x), eps)

        lon = state.lower_order_nums
        p = cfg.solver_order
        order = common.multistep_order(p, lon, i, n, cfg.lower_order_final)

        # x_t = alpha_t (x_s / alpha_s + sum_j c_j eps_j), c_j the integral of the j-th Lagrange basis
        # over rho in [rho_s0, rho_t] (Zhang & Chen 2023, eq. 14); first order is DDIM. Near sigma ~ 1e4
        # (cosine schedules) x_s / alpha_s and the c_j eps_j terms cancel to a few digits, so the sum keeps
        # diffusers' grouping to stay within fp32 rounding of it.
        r_t, r0, r1, r2 = s_t / a_t, s0 / a0, s1 / a1, s2 / a2
        zero = jnp.zeros_like(r_t)
        h = common.log_snr(a_t, s_t) - common.log_snr(a0, s0)
        first = (a_t / a0) * x - (s_t * (jnp.exp(h) - 1.0)) * history[-1]
        if p == 1:
            prev = first
        else:
            f = _lagrange_integral_2
            coefs = [(f(r_t, r0, r1) - f(r0, r0, r1), f(r_t, r1, r0) - f(r0, r1, r0), zero)]
            if p >= 3:
                g = _lagrange_integral_3
                coefs.append((g(r_t, r0, r1, r2) - g(r0, r0, r1, r2), g(r_t, r1, r2, r0) - g(r0, r1, r2, r0),
                              g(r_t, r2, r0, r1) - g(r0, r2, r0, r1)))
            inner = x / a0
            for j in range(p):
                c = coefs[0][j] if p == 2 else jnp.where(order == 2, coefs[0][j], coefs[1][j])
                inner = inner + c * history[p - 1 - j]
            prev = jnp.where(order == 1, first, a_t * inner)
        state = state.replace(
            model_outputs=history,
            lower_order_nums=jnp.minimum(lon + 1, p).astype(jnp.int32),
            step_index=(i + 1).astype(jnp.int32),
        )
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=state,
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state, original, noise, timesteps):
        return common.add_noise_vp(state, original, noise, timesteps)
