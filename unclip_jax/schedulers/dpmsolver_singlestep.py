"""Singlestep DPM-Solver / DPM-Solver++ (Lu et al. 2022, arXiv:2206.00927 Alg. 1 and 2211.01095 Alg. 1),
the counterpart of diffusers' `DPMSolverSinglestepScheduler`.

Steps come in groups of 1, 2 or 3 (`order_list`): a group integrates from the sample at its first timestep,
using the model outputs at every timestep of the group as the intermediate evaluations of one k-th order
step; the first timestep of a group stores its sample. The order of each step is a table in the state,
read at the traced step index.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common


@dataclasses.dataclass(frozen=True)
class DPMSolverSinglestepConfig:
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
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    def __post_init__(self):
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        if self.algorithm_type not in ("dpmsolver", "dpmsolver++", "sde-dpmsolver++"):
            raise common.SchedulerConfigError(f"algorithm_type {self.algorithm_type!r} is not supported")
        if self.solver_type not in ("midpoint", "heun"):
            raise common.SchedulerConfigError(f"solver_type {self.solver_type!r} is not supported")
        if self.solver_order not in (1, 2, 3):
            raise common.SchedulerConfigError(f"solver_order {self.solver_order} is not supported (1, 2 or 3)")
        if self.algorithm_type == "dpmsolver" and self.final_sigmas_type == "zero":
            raise common.SchedulerConfigError("final_sigmas_type 'zero' needs a data-prediction algorithm")
        if self.algorithm_type == "dpmsolver" and self.thresholding:
            # diffusers indexes its alpha table with a missing timestep here and fails.
            raise common.SchedulerConfigError("thresholding is not supported with algorithm_type 'dpmsolver'")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise common.SchedulerConfigError(f"final_sigmas_type {self.final_sigmas_type!r} is not supported")
        common.check_unsupported(self, "DPMSolverSinglestepScheduler")


@flax.struct.dataclass
class DPMSolverSinglestepState:
    """timesteps [N]; sigmas [N + 1]; order_list [N] the order of each step; model_outputs [order, ...] the
    converted outputs, newest last; num_outputs how many of those are real; sample the sample at the start
    of the current group; step_index / begin_index: -1 = unset."""

    timesteps: jax.Array
    sigmas: jax.Array
    alphas_cumprod: jax.Array
    init_noise_sigma: jax.Array
    order_list: jax.Array
    model_outputs: jax.Array
    num_outputs: jax.Array
    sample: jax.Array
    step_index: jax.Array
    begin_index: jax.Array


def order_list(num_steps: int, solver_order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """Orders of the steps: repeated groups 1, 2, ..., solver_order; with `lower_order_final` the tail
    is split into lower-order groups so no group overruns the schedule; a zero final sigma ends first order."""
    n, p = num_steps, solver_order
    if lower_order_final:
        if p == 3:
            tail = {0: [1, 2] + [1], 1: [1], 2: [1, 2]}[n % 3]
            orders = [1, 2, 3] * (n // 3 - (1 if n % 3 == 0 else 0)) + tail
        elif p == 2:
            orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
        else:
            orders = [1] * n
    else:
        orders = {3: [1, 2, 3] * (n // 3), 2: [1, 2] * (n // 2), 1: [1] * n}[p]
    if final_zero:
        orders[-1] = 1
    return orders


@dataclasses.dataclass(frozen=True)
class DPMSolverSinglestepScheduler(common.Scheduler):
    config: DPMSolverSinglestepConfig = DPMSolverSinglestepConfig()

    order = 1

    def _state(self, timesteps, sigmas, orders, shape) -> DPMSolverSinglestepState:
        ac = common.train_alphas_cumprod(self.config)
        return DPMSolverSinglestepState(
            timesteps=jnp.asarray(timesteps, jnp.int32),
            sigmas=jnp.asarray(sigmas, jnp.float32),
            alphas_cumprod=jnp.asarray(ac),
            init_noise_sigma=jnp.float32(1.0),
            order_list=jnp.asarray(orders, jnp.int32),
            model_outputs=jnp.zeros(common.history_shape(self.config.solver_order, shape), jnp.float32),
            num_outputs=jnp.int32(0),
            sample=jnp.zeros(common.history_shape(1, shape)[1:], jnp.float32),
            step_index=jnp.int32(-1),
            begin_index=jnp.int32(-1),
        )

    def create_state(self, shape=None) -> DPMSolverSinglestepState:
        cfg = self.config
        ac = common.train_alphas_cumprod(cfg)
        t = cfg.num_train_timesteps
        orders = order_list(t, cfg.solver_order, cfg.lower_order_final, cfg.final_sigmas_type == "zero")
        return self._state(np.arange(t - 1, -1, -1), common.train_sigmas(ac), orders, shape)

    def schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(timesteps int64 [N], sigmas float32 [N + 1], order of each step) as diffusers builds them."""
        cfg, n = self.config, num_inference_steps
        ac = common.train_alphas_cumprod(cfg)
        clipped = int(np.searchsorted(np.flip(common.train_lambdas(ac)), cfg.lambda_min_clipped))
        timesteps = common.spaced_timesteps("linspace", cfg.num_train_timesteps, n,
                                        last_timestep=cfg.num_train_timesteps - clipped)
        sig = common.train_sigmas(ac)
        log_sig = np.log(sig)
        kind = common.sigma_kind(cfg)
        if kind is not None:
            sigmas = common.respaced_sigmas(kind, np.flip(sig), n)
            timesteps = common.sigma_to_t(sigmas, log_sig)
            if kind == "karras":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(sig)), sig)
        last = ((1 - ac[0]) / ac[0]) ** 0.5 if cfg.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        # diffusers switches lower_order_final on when the groups cannot tile the schedule or the last
        # sigma is zero.
        final_zero = cfg.final_sigmas_type == "zero"
        lower_final = cfg.lower_order_final or n % cfg.solver_order != 0 or final_zero
        orders = order_list(n, cfg.solver_order, lower_final, final_zero)
        return np.asarray(timesteps).astype(np.int64), sigmas, orders

    def set_timesteps(self, state, num_inference_steps: int, shape=None) -> DPMSolverSinglestepState:
        """`shape`: the sample shape, which sizes the stored outputs (see DPMSolverMultistepScheduler)."""
        common.check_num_inference_steps(self.config, num_inference_steps, "DPMSolverSinglestepScheduler")
        timesteps, sigmas, orders = self.schedule(num_inference_steps)
        return self._state(timesteps, sigmas, orders, shape)

    def scale_model_input(self, state, sample, timestep=None):
        return sample

    def _convert(self, model_output, sample, alpha, sigma):
        cfg = self.config
        if cfg.prediction_type == "epsilon":
            model_output = common.learned_variance_mean(model_output, cfg.variance_type)
        if cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            x0 = common.data_prediction(cfg.prediction_type, model_output, sample, alpha, sigma)
            if cfg.thresholding:
                x0 = common.threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            return x0, x0
        eps = common.noise_prediction(cfg.prediction_type, model_output, sample, alpha, sigma)
        return eps, (sample - sigma * eps) / alpha

    def _group_weights(self, k: int, sigmas, i):
        """(c_x, (w_0, w_1, w_2), c_noise) of a k-th order group ending at step i: x_t = c_x x_base +
        sum_j w_j m_j + c_noise z with m_0 the newest output and x_base the sample at step i - k + 1."""
        cfg = self.config
        algo, midpoint = cfg.algorithm_type, cfg.solver_type == "midpoint"
        a_t, s_t = common.alpha_sigma(common.sigma_at(sigmas, i + 1))
        a_b, s_b = common.alpha_sigma(common.sigma_at(sigmas, i - k + 1))
        lam = lambda j: common.log_snr(*common.alpha_sigma(common.sigma_at(sigmas, j)))  # noqa: E731
        lam_b = common.log_snr(a_b, s_b)
        h = common.log_snr(a_t, s_t) - lam_b
        zero = jnp.zeros_like(h)
        if algo == "dpmsolver++":
            phi1 = jnp.exp(-h) - 1.0
            cx, cn, c0 = s_t / s_b, zero, -a_t * phi1
            c_mid, c_heun = -0.5 * a_t * phi1, a_t * (phi1 / h + 1.0)
            c2 = -a_t * ((jnp.exp(-h) - 1.0 + h) / h**2 - 0.5)
        elif algo == "dpmsolver":
            phi1 = jnp.exp(h) - 1.0
            cx, cn, c0 = a_t / a_b, zero, -s_t * phi1
            c_mid, c_heun = -0.5 * s_t * phi1, -s_t * (phi1 / h - 1.0)
            c2 = -s_t * ((jnp.exp(h) - 1.0 - h) / h**2 - 0.5)
        else:  # sde-dpmsolver++
            e2 = 1.0 - jnp.exp(-2.0 * h)
            cx, cn, c0 = s_t / s_b * jnp.exp(-h), s_t * jnp.sqrt(e2), a_t * e2
            c_mid, c_heun = 0.5 * a_t * e2, a_t * (e2 / (-2.0 * h) + 1.0)
            c2 = a_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        if k == 1:
            return cx, (c0, zero, zero), cn
        if k == 2:
            # D0 = m1, D1 = (m0 - m1) / r0.
            r0 = (lam(i) - lam_b) / h
            c1 = c_mid if midpoint else c_heun
            return cx, (c1 / r0, c0 - c1 / r0, zero), cn
        # Third order: D0 = m2, D1_0 = (m1 - m2) / r1, D1_1 = (m0 - m2) / r0.
        r0, r1 = (lam(i) - lam_b) / h, (lam(i - 1) - lam_b) / h
        if midpoint:
            return cx, (c_heun / r0, zero, c0 - c_heun / r0), cn
        # D1 = (r0 D1_0 - r1 D1_1) / (r0 - r1), D2 = 2 (D1_1 - D1_0) / (r0 - r1).
        big_a = (c_heun * r0 - 2.0 * c2) / (r0 - r1)
        big_b = (2.0 * c2 - c_heun * r1) / (r0 - r1)
        return cx, (big_b / r0, big_a / r1, c0 - big_a / r1 - big_b / r0), cn

    def step(self, state, model_output, timestep, sample, *, key=None, noise=None) -> common.SchedulerOutput:
        cfg = self.config
        p = cfg.solver_order
        i = common.current_step_index(state, timestep)
        x = sample.astype(jnp.float32)
        a0, s0 = common.alpha_sigma(common.sigma_at(state.sigmas, i))
        m, x0 = self._convert(model_output.astype(jnp.float32), x, a0, s0)
        history = common.push(common.history_for(state.model_outputs, x), m)
        num_outputs = jnp.minimum(state.num_outputs + 1, p)
        # The scheduled order, lowered while fewer outputs exist (a start mid-schedule).
        order = jnp.minimum(state.order_list[jnp.clip(i, 0, state.order_list.shape[0] - 1)], num_outputs)
        stored = state.sample if state.sample.shape == x.shape else jnp.zeros_like(x)
        base = jnp.where(order == 1, x, stored)

        weights = [self._group_weights(k, state.sigmas, i) for k in range(1, p + 1)]
        sel = lambda vals: jnp.select([order == k + 1 for k in range(len(vals))], vals)  # noqa: E731
        prev = sel([w[0] for w in weights]) * base
        for j in range(p):
            prev = prev + sel([w[1][j] for w in weights]) * history[p - 1 - j]
        if cfg.algorithm_type == "sde-dpmsolver++":
            z = common.gaussian(key, noise, x.shape, "an sde-dpmsolver++ step")
            prev = prev + sel([w[2] for w in weights]) * z
        state = state.replace(
            model_outputs=history,
            num_outputs=num_outputs.astype(jnp.int32),
            sample=base,
            step_index=(i + 1).astype(jnp.int32),
        )
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=state,
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state, original, noise, timesteps):
        return common.add_noise_vp(state, original, noise, timesteps)
