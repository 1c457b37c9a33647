"""DPM-Solver and DPM-Solver++ multistep sampling (Lu et al. 2022, arXiv:2206.00927 and 2211.01095),
the counterpart of diffusers' `DPMSolverMultistepScheduler`.

The solver integrates the diffusion ODE (or, for the `sde-` variants, SDE) exactly in its linear part and
approximates the model output by a polynomial in lambda = log(alpha / sigma) through the last 1-3 outputs.
Every order's update is a weighted sum of the sample and the stored outputs, so `step` computes the few
scalar weights of each order and selects them by the (traced) order: the sample arithmetic is one fused
expression whatever the order.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepConfig:
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
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    def __post_init__(self):
        # diffusers maps the options of sibling solvers onto its own (a DEIS or UniPC config loads as DPM++).
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        if self.algorithm_type not in ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"):
            raise common.SchedulerConfigError(f"algorithm_type {self.algorithm_type!r} is not supported")
        if self.solver_type not in ("midpoint", "heun"):
            raise common.SchedulerConfigError(f"solver_type {self.solver_type!r} is not supported")
        if self.solver_order not in (1, 2, 3):
            raise common.SchedulerConfigError(f"solver_order {self.solver_order} is not supported (1, 2 or 3)")
        if self.algorithm_type == "sde-dpmsolver" and self.solver_order == 3:
            raise common.SchedulerConfigError("sde-dpmsolver has no third-order update (diffusers fails there too)")
        if self.algorithm_type in ("dpmsolver", "sde-dpmsolver") and self.final_sigmas_type == "zero":
            raise common.SchedulerConfigError(
                f"final_sigmas_type 'zero' needs a data-prediction algorithm, not {self.algorithm_type!r}")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise common.SchedulerConfigError(f"final_sigmas_type {self.final_sigmas_type!r} is not supported")
        common.check_unsupported(self, "DPMSolverMultistepScheduler")


DPMSolverMultistepState = common.MultistepState


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(common.Scheduler):
    config: DPMSolverMultistepConfig = DPMSolverMultistepConfig()

    order = 1

    def _state(self, timesteps, sigmas, shape) -> DPMSolverMultistepState:
        ac = common.train_alphas_cumprod(self.config, zero_snr_last=common.ZERO_SNR_SIGMA_ABAR)
        return common.multistep_state(timesteps, sigmas, ac, self.config.solver_order, shape)

    def create_state(self, shape=None) -> DPMSolverMultistepState:
        ac = common.train_alphas_cumprod(self.config, zero_snr_last=common.ZERO_SNR_SIGMA_ABAR)
        t = self.config.num_train_timesteps
        return self._state(np.arange(t - 1, -1, -1), common.train_sigmas(ac), shape)

    def schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps int64 [N], sigmas float32 [N + 1]) as diffusers' `set_timesteps` builds them."""
        cfg, n = self.config, num_inference_steps
        ac = common.train_alphas_cumprod(cfg, zero_snr_last=common.ZERO_SNR_SIGMA_ABAR)
        lambdas = common.train_lambdas(ac)
        # lambda_min_clipped drops the noisiest timesteps whose log-SNR is below it (cosine schedules).
        clipped = int(np.searchsorted(np.flip(lambdas), cfg.lambda_min_clipped))
        last = cfg.num_train_timesteps - clipped
        timesteps = common.spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset, last)
        sig = common.train_sigmas(ac)
        log_sig = np.log(sig)
        kind = common.sigma_kind(cfg)
        rounded = cfg.beta_schedule != "squaredcos_cap_v2"
        if kind == "karras" or cfg.use_lu_lambdas:
            if kind == "karras":
                sigmas = common.respaced_sigmas("karras", np.flip(sig), n)
            else:  # evenly spaced in log-sigma (Lu et al. 2023, "DPM-Solver-v3" / uniform logSNR)
                ls = np.flip(log_sig)
                sigmas = np.exp(float(ls[0]) + np.linspace(0, 1, n) * (float(ls[-1]) - float(ls[0])))
            timesteps = common.sigma_to_t(sigmas, log_sig)
            if rounded:
                timesteps = timesteps.round()
        elif kind is not None:
            sigmas = common.respaced_sigmas(kind, np.flip(sig), n)
            timesteps = common.sigma_to_t(sigmas, log_sig)
        else:
            sigmas = np.interp(timesteps, np.arange(len(sig)), sig)
        last_sigma = float(((1 - ac[0]) / ac[0]) ** 0.5) if cfg.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last_sigma]]).astype(np.float32)
        return np.asarray(timesteps).astype(np.int64), sigmas

    def set_timesteps(self, state, num_inference_steps: int, shape=None) -> DPMSolverMultistepState:
        """`shape`: the sample shape [B, ...], which sizes the output history (needed before a
        `lax.fori_loop`; without it the first `step` sizes it)."""
        common.check_num_inference_steps(self.config, num_inference_steps, "DPMSolverMultistepScheduler")
        timesteps, sigmas = self.schedule(num_inference_steps)
        return self._state(timesteps, sigmas, shape)

    def scale_model_input(self, state, sample, timestep=None):
        return sample

    def _convert(self, model_output, sample, alpha, sigma):
        """The quantity the solver extrapolates: x_0 for the ++ (data-prediction) algorithms, eps otherwise."""
        cfg = self.config
        if cfg.prediction_type == "epsilon":
            model_output = common.learned_variance_mean(model_output, cfg.variance_type)
        if cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            x0 = common.data_prediction(cfg.prediction_type, model_output, sample, alpha, sigma)
            if cfg.thresholding:
                x0 = common.threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            return x0, x0
        eps = common.noise_prediction(cfg.prediction_type, model_output, sample, alpha, sigma)
        x0 = (sample - sigma * eps) / alpha
        if cfg.thresholding:
            x0 = common.threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            eps = (sample - alpha * x0) / sigma
        return eps, x0

    def _weights(self, order_max: int, h, h0, h1, a_t, s_t, a_s0, s_s0):
        """Per order k: (c_x, (w_0, w_1, w_2), c_noise) with x_t = c_x x + sum_j w_j m_j + c_noise z, m_0 the
        newest converted output (Lu et al. 2022b, Alg. 1-2; the SDE variants follow their sec. 5)."""
        cfg = self.config
        algo, midpoint = cfg.algorithm_type, cfg.solver_type == "midpoint"
        zero = jnp.zeros_like(h)
        if algo == "dpmsolver++":
            cx, cn = s_t / s_s0, zero
            phi1 = jnp.exp(-h) - 1.0
            c0 = -a_t * phi1
            c1_2 = -0.5 * a_t * phi1 if midpoint else a_t * (phi1 / h + 1.0)
            c1_3 = a_t * (phi1 / h + 1.0)
            c2_3 = -a_t * ((jnp.exp(-h) - 1.0 + h) / h**2 - 0.5)
        elif algo == "dpmsolver":
            cx, cn = a_t / a_s0, zero
            phi1 = jnp.exp(h) - 1.0
            c0 = -s_t * phi1
            c1_2 = -0.5 * s_t * phi1 if midpoint else -s_t * (phi1 / h - 1.0)
            c1_3 = -s_t * (phi1 / h - 1.0)
            c2_3 = -s_t * ((jnp.exp(h) - 1.0 - h) / h**2 - 0.5)
        elif algo == "sde-dpmsolver++":
            e2 = 1.0 - jnp.exp(-2.0 * h)
            cx, cn = s_t / s_s0 * jnp.exp(-h), s_t * jnp.sqrt(e2)
            c0 = a_t * e2
            c1_2 = 0.5 * a_t * e2 if midpoint else a_t * (e2 / (-2.0 * h) + 1.0)
            c1_3 = a_t * (e2 / (-2.0 * h) + 1.0)
            c2_3 = a_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        else:  # sde-dpmsolver
            phi1 = jnp.exp(h) - 1.0
            cx, cn = a_t / a_s0, s_t * jnp.sqrt(jnp.exp(2.0 * h) - 1.0)
            c0 = -2.0 * s_t * phi1
            c1_2 = -s_t * phi1 if midpoint else -2.0 * s_t * (phi1 / h - 1.0)
            c1_3 = c2_3 = zero
        out = [(cx, (c0, zero, zero), cn)]
        if order_max >= 2:
            # D1 = (m0 - m1) / r0, r0 = h0 / h.
            r0 = h0 / h
            out.append((cx, (c0 + c1_2 / r0, -c1_2 / r0, zero), cn))
        if order_max >= 3:
            # D1 = (1 + q) D1_0 - q D1_1, D2 = u (D1_0 - D1_1), D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1.
            r0, r1 = h0 / h, h1 / h
            q, u = r0 / (r0 + r1), 1.0 / (r0 + r1)
            big_a, big_b = c1_3 * (1.0 + q) + c2_3 * u, c1_3 * q + c2_3 * u
            out.append((cx, (c0 + big_a / r0, -big_a / r0 - big_b / r1, big_b / r1), cn))
        return out

    def step(self, state, model_output, timestep, sample, *, key=None, noise=None) -> common.SchedulerOutput:
        cfg = self.config
        n = state.timesteps.shape[0]
        i = common.current_step_index(state, timestep)
        sig = lambda k: common.sigma_at(state.sigmas, k)  # noqa: E731
        a_t, s_t = common.alpha_sigma(sig(i + 1))
        a0, s0 = common.alpha_sigma(sig(i))
        a1, s1 = common.alpha_sigma(sig(i - 1))
        a2, s2 = common.alpha_sigma(sig(i - 2))
        lam_t, lam0, lam1, lam2 = (common.log_snr(a_t, s_t), common.log_snr(a0, s0),
                                   common.log_snr(a1, s1), common.log_snr(a2, s2))
        x = sample.astype(jnp.float32)
        m, x0 = self._convert(model_output.astype(jnp.float32), x, a0, s0)
        history = common.push(common.history_for(state.model_outputs, x), m)

        lon = state.lower_order_nums
        p = cfg.solver_order
        # A zero final sigma (lambda = inf) admits only the first-order update.
        order = common.multistep_order(p, lon, i, n, cfg.lower_order_final,
                                       final_first_order=cfg.euler_at_final or cfg.final_sigmas_type == "zero")

        weights = self._weights(p, lam_t - lam0, lam0 - lam1, lam1 - lam2, a_t, s_t, a0, s0)
        pick = lambda k: [w[k] for w in weights]  # noqa: E731
        sel = lambda vals: jnp.select([order == j + 1 for j in range(len(vals))], vals)  # noqa: E731
        cx = sel(pick(0))
        cn = sel(pick(2))
        ws = [sel([w[1][j] for w in weights]) for j in range(p)]
        prev = cx * x
        for j in range(p):
            prev = prev + ws[j] * history[p - 1 - j]
        if cfg.algorithm_type.startswith("sde-"):
            prev = prev + cn * common.gaussian(key, noise, x.shape, "an sde-dpmsolver step")
        state = state.replace(
            model_outputs=history,
            lower_order_nums=jnp.minimum(lon + 1, p).astype(jnp.int32),
            step_index=(i + 1).astype(jnp.int32),
        )
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=state,
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state, original, noise, timesteps):
        return common.add_noise_vp(state, original, noise, timesteps)
