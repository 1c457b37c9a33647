"""UniPC multistep sampling (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework",
arXiv:2302.04867), the counterpart of diffusers' `UniPCMultistepScheduler`.

Each step first corrects the sample it is given (UniC, using the fresh model output at that sample) and
then predicts the next one (UniP). Both are the same exponential-integrator update from a base point with
a polynomial correction through the stored outputs; its coefficients (rho) solve a small Vandermonde
system in the ratios r_k of log-SNR steps (paper Alg. 2 and 3, B(h) variants bh1 / bh2).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.schedulers import common


@dataclasses.dataclass(frozen=True)
class UniPCMultistepConfig:
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
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    solver_p: None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    sigma_min: float | None = None
    sigma_max: float | None = None
    shift_terminal: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "disable_corrector", tuple(self.disable_corrector or ()))
        # diffusers loads a DPM-Solver or DEIS config as UniPC bh2.
        if self.solver_type in ("midpoint", "heun", "logrho"):
            object.__setattr__(self, "solver_type", "bh2")
        if self.solver_type not in ("bh1", "bh2"):
            raise common.SchedulerConfigError(f"solver_type {self.solver_type!r} is not supported")
        if self.solver_order < 1:
            raise common.SchedulerConfigError(f"solver_order {self.solver_order} is not supported")
        if self.solver_p is not None:
            raise common.SchedulerConfigError("an external predictor scheduler (solver_p) is not supported")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise common.SchedulerConfigError(f"final_sigmas_type {self.final_sigmas_type!r} is not supported")
        if self.shift_terminal is not None:
            raise common.SchedulerConfigError("shift_terminal needs flow-matching sigmas, which are not supported")
        common.check_unsupported(self, "UniPCMultistepScheduler")


@flax.struct.dataclass
class UniPCMultistepState:
    """As `common.MultistepState`, plus: last_sample, the sample the previous predictor started from (the
    corrector's base); this_order, that predictor's order; corrector_off [N], steps whose following
    corrector `disable_corrector` switches off."""

    timesteps: jax.Array
    sigmas: jax.Array
    alphas_cumprod: jax.Array
    init_noise_sigma: jax.Array
    model_outputs: jax.Array
    last_sample: jax.Array
    lower_order_nums: jax.Array
    this_order: jax.Array
    corrector_off: jax.Array
    step_index: jax.Array
    begin_index: jax.Array


@dataclasses.dataclass(frozen=True)
class UniPCMultistepScheduler(common.Scheduler):
    config: UniPCMultistepConfig = UniPCMultistepConfig()

    order = 1

    def _state(self, timesteps, sigmas, shape) -> UniPCMultistepState:
        cfg = self.config
        ac = common.train_alphas_cumprod(cfg, zero_snr_last=common.ZERO_SNR_SIGMA_ABAR)
        n = len(timesteps)
        off = np.zeros(n, bool)
        for k in cfg.disable_corrector:
            if 0 <= k < n:
                off[k] = True
        return UniPCMultistepState(
            timesteps=jnp.asarray(timesteps, jnp.int32),
            sigmas=jnp.asarray(sigmas, jnp.float32),
            alphas_cumprod=jnp.asarray(ac),
            init_noise_sigma=jnp.float32(1.0),
            model_outputs=jnp.zeros(common.history_shape(cfg.solver_order, shape), jnp.float32),
            last_sample=jnp.zeros(common.history_shape(1, shape)[1:], jnp.float32),
            lower_order_nums=jnp.int32(0),
            this_order=jnp.int32(1),
            corrector_off=jnp.asarray(off),
            step_index=jnp.int32(-1),
            begin_index=jnp.int32(-1),
        )

    def create_state(self, shape=None) -> UniPCMultistepState:
        ac = common.train_alphas_cumprod(self.config, zero_snr_last=common.ZERO_SNR_SIGMA_ABAR)
        t = self.config.num_train_timesteps
        return self._state(np.arange(t - 1, -1, -1), common.train_sigmas(ac), shape)

    def schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps int64 [N], sigmas float32 [N + 1]) as diffusers' `set_timesteps` builds them."""
        cfg, n = self.config, num_inference_steps
        ac = common.train_alphas_cumprod(cfg, zero_snr_last=common.ZERO_SNR_SIGMA_ABAR)
        timesteps = common.spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
        sig = common.train_sigmas(ac)
        log_sig = np.log(sig)
        kind = common.sigma_kind(cfg)
        if kind is not None:
            sigmas = common.respaced_sigmas(kind, np.flip(sig), n, cfg.sigma_min, cfg.sigma_max)
            timesteps = common.sigma_to_t(sigmas, log_sig)
            if kind == "karras":
                timesteps = timesteps.round()
            last = sigmas[-1] if cfg.final_sigmas_type == "sigma_min" else 0.0
        else:
            sigmas = np.interp(timesteps, np.arange(len(sig)), sig)
            last = ((1 - ac[0]) / ac[0]) ** 0.5 if cfg.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return np.asarray(timesteps).astype(np.int64), sigmas

    def set_timesteps(self, state, num_inference_steps: int, shape=None) -> UniPCMultistepState:
        """`shape`: the sample shape, which sizes the output history (see DPMSolverMultistepScheduler)."""
        common.check_num_inference_steps(self.config, num_inference_steps, "UniPCMultistepScheduler")
        timesteps, sigmas = self.schedule(num_inference_steps)
        return self._state(timesteps, sigmas, shape)

    def scale_model_input(self, state, sample, timestep=None):
        return sample

    def _convert(self, model_output, sample, alpha, sigma):
        """(solver variable, x0): x_0 when predicting data, eps otherwise."""
        cfg = self.config
        x0 = common.data_prediction(cfg.prediction_type, model_output, sample, alpha, sigma)
        if cfg.predict_x0:
            if cfg.thresholding:
                x0 = common.threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            return x0, x0
        return common.noise_prediction(cfg.prediction_type, model_output, sample, alpha, sigma), x0

    def _update(self, sigmas, base, x, history, order, model_t=None):
        """One UniP (model_t None) or UniC update from sigmas[base] to sigmas[base + 1] of sample x, with
        history[-1] the output at `base` and history[-1 - j] the one at base - j; `order` is traced."""
        cfg = self.config
        p_max = history.shape[0]
        a_t, s_t = common.alpha_sigma(common.sigma_at(sigmas, base + 1))
        a_b, s_b = common.alpha_sigma(common.sigma_at(sigmas, base))
        lam_b = common.log_snr(a_b, s_b)
        h = common.log_snr(a_t, s_t) - lam_b
        m0 = history[-1]
        rks = []
        for j in range(1, p_max):
            a_j, s_j = common.alpha_sigma(common.sigma_at(sigmas, base - j))
            rks.append(jnp.where(j < order, (common.log_snr(a_j, s_j) - lam_b) / h, 1.0))
        hh = -h if cfg.predict_x0 else h
        h_phi_1 = jnp.expm1(hh)
        b_h = hh if cfg.solver_type == "bh1" else jnp.expm1(hh)
        # b_k = k! phi_{k+1}(hh) hh / B(h), through the recursion phi_{k+1} = (phi_k - 1/k!) / hh.
        bs, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1
        for k in range(1, p_max + 1):
            bs.append(h_phi_k * fact / b_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / fact
        # rho per order p: predictor solves the (p-1)-system without r = 1 (p = 2 uses the paper's 1/2);
        # corrector solves the full p-system whose last column is r = 1 (p = 1 uses 1/2).
        zero = jnp.zeros_like(h)
        per_order = []
        for p in range(1, p_max + 1):
            if model_t is None:
                if p == 1:
                    rho = []
                elif p == 2:
                    rho = [jnp.float32(0.5)]
                else:
                    r = jnp.stack(rks[: p - 1])
                    mat = jnp.stack([r**k for k in range(p - 1)])
                    rho = list(jnp.linalg.solve(mat, jnp.stack(bs[: p - 1])))
                rho_t = zero
            else:
                if p == 1:
                    rho, rho_t = [], jnp.float32(0.5)
                else:
                    r = jnp.stack(rks[: p - 1] + [jnp.ones_like(h)])
                    mat = jnp.stack([r**k for k in range(p)])
                    sol = jnp.linalg.solve(mat, jnp.stack(bs[:p]))
                    rho, rho_t = list(sol[:-1]), sol[-1]
            per_order.append(rho + [zero] * (p_max - 1 - len(rho)) + [rho_t])
        sel = lambda vals: jnp.select([order == p + 1 for p in range(p_max)], vals)  # noqa: E731
        coeffs = [sel([c[j] for c in per_order]) for j in range(p_max)]
        res = jnp.zeros_like(x)
        for j in range(1, p_max):
            res = res + (coeffs[j - 1] / rks[j - 1]) * (history[-1 - j] - m0)
        if model_t is not None:
            res = res + coeffs[-1] * (model_t - m0)
        if cfg.predict_x0:
            return s_t / s_b * x - a_t * h_phi_1 * m0 - a_t * b_h * res
        return a_t / a_b * x - s_t * h_phi_1 * m0 - s_t * b_h * res

    def step(self, state, model_output, timestep, sample, *, key=None, noise=None) -> common.SchedulerOutput:
        cfg = self.config
        n = state.timesteps.shape[0]
        p = cfg.solver_order
        i = common.current_step_index(state, timestep)
        x = sample.astype(jnp.float32)
        history = common.history_for(state.model_outputs, x)
        last = state.last_sample if state.last_sample.shape == x.shape else jnp.zeros_like(x)
        a0, s0 = common.alpha_sigma(common.sigma_at(state.sigmas, i))
        m, x0 = self._convert(model_output.astype(jnp.float32), x, a0, s0)
        lon = state.lower_order_nums

        # UniC: refine the sample the previous predictor produced, now that the model has seen it.
        use_corrector = (i > 0) & (lon > 0) & ~state.corrector_off[jnp.clip(i - 1, 0, n - 1)]
        corrected = self._update(state.sigmas, i - 1, last, history, state.this_order, model_t=m)
        x = jnp.where(use_corrector, corrected, x)

        history = common.push(history, m)
        this_order = jnp.minimum(p, n - i) if cfg.lower_order_final else jnp.int32(p)
        this_order = jnp.minimum(this_order, lon + 1).astype(jnp.int32)
        prev = self._update(state.sigmas, i, x, history, this_order)
        state = state.replace(
            model_outputs=history,
            last_sample=x,
            lower_order_nums=jnp.minimum(lon + 1, p).astype(jnp.int32),
            this_order=this_order,
            step_index=(i + 1).astype(jnp.int32),
        )
        return common.SchedulerOutput(prev_sample=prev.astype(sample.dtype), state=state,
                                      pred_original_sample=x0.astype(sample.dtype))

    def add_noise(self, state, original, noise, timesteps):
        return common.add_noise_vp(state, original, noise, timesteps)
