"""The train step's pieces against diffusers' (schedules, EMA decay) and against themselves (accumulation,
remat, sharding, bf16 master copies)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.sharding import Layout, make_mesh
from unclip_jax.training import step as S
from unclip_jax.training.objective import Objective


@pytest.mark.parametrize("name", S.LR_SCHEDULERS)
def test_lr_schedules_match_diffusers(name):
    import torch
    from diffusers.optimization import get_scheduler

    total, warm, lr = 40, 7, 3e-4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=total)
    want = []
    for _ in range(total + 3):
        want.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    ours = S.lr_schedule(S.StepConfig(steps=total, learning_rate=lr, lr_scheduler=name, lr_warmup_steps=warm))
    got = [float(ours(i)) for i in range(total + 3)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=lr * 1e-6)  # f32 arithmetic, relative to the peak


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_decay_matches_diffusers_emamodel(warmup):
    import torch
    from diffusers.training_utils import EMAModel

    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999, min_decay=0.01, update_after_step=2,
                   use_ema_warmup=warmup, inv_gamma=1.5, power=0.75)
    config = S.StepConfig(steps=10, ema_decay=0.999, ema_min_decay=0.01, ema_update_after_step=2,
                          ema_warmup=warmup, ema_inv_gamma=1.5, ema_power=0.75)
    for step in (1, 2, 3, 4, 10, 100, 10_000):
        np.testing.assert_allclose(float(S.ema_decay(config, jnp.int32(step))), ema.get_decay(step), rtol=1e-6)


def test_ema_update_follows_emamodel_step():
    import torch
    from diffusers.training_utils import EMAModel

    rng = np.random.default_rng(0)
    p = torch.nn.Parameter(torch.tensor(rng.normal(size=5).astype(np.float32)))
    ema = EMAModel([p], decay=0.99)
    config = S.StepConfig(steps=10, ema_decay=0.99)
    ours = {"p": jnp.asarray(p.detach().numpy())}
    for step in range(1, 6):
        with torch.no_grad():
            p.add_(torch.tensor(rng.normal(size=5).astype(np.float32)))
        ema.step([p])
        ours = S.ema_update(config, ours, {"p": jnp.asarray(p.detach().numpy())}, jnp.int32(step))
        np.testing.assert_allclose(np.asarray(ours["p"]), ema.shadow_params[0].numpy(), rtol=1e-6, atol=1e-7)


def _linear_objective():
    def loss(trainable, frozen, batch, key):
        pred = batch["x"] @ trainable["w"].astype(jnp.float32) + frozen["b"]
        return jnp.mean((pred - batch["y"]) ** 2), {"mean_pred": jnp.mean(pred)}

    return Objective(name="linear", collate=None, split=None, merge=None, loss=loss, save=None, pipeline_class=object)


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 6)).astype(np.float32), "y": rng.normal(size=(n,)).astype(np.float32)}


def _run(config, batch, layout=None, steps=3):
    objective = _linear_objective()
    trainable = {"w": np.linspace(-1, 1, 6).astype(np.float32)}
    frozen = {"b": np.float32(0.5)}
    layout = layout or Layout(make_mesh(devices=jax.devices()[:1]))
    state = S.init_state(config, trainable, 0)
    fn = S.compile_step(objective, config, layout, state, frozen, batch)
    out = []
    for _ in range(steps):
        state, metrics = fn(state, frozen, batch)
        out.append(jax.device_get(metrics))
    return state, out


def test_accumulation_is_one_step_on_the_whole_batch():
    batch = _batch(8)
    base = dict(steps=5, learning_rate=0.1, lr_warmup_steps=0, ema_decay=0.9)
    one, m1 = _run(S.StepConfig(**base), batch)
    # Accumulated rows b*2+i form micro-batch i: the average of two half-batch gradients of a mean loss.
    two, m2 = _run(S.StepConfig(**base, gradient_accumulation_steps=2), batch)
    np.testing.assert_allclose(np.asarray(two.trainable["w"]), np.asarray(one.trainable["w"]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(two.ema["w"]), np.asarray(one.ema["w"]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose([m["loss"] for m in m2], [m["loss"] for m in m1], rtol=1e-6)
    assert int(two.step) == 3


def test_sharded_step_equals_single_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    batch = _batch(8)
    config = S.StepConfig(steps=5, learning_rate=0.1, lr_warmup_steps=0, max_grad_norm=0.5)
    one, m1 = _run(config, batch)
    eight, m8 = _run(config, batch, Layout(make_mesh()))
    np.testing.assert_allclose(np.asarray(eight.trainable["w"]), np.asarray(one.trainable["w"]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose([m["grad_norm"] for m in m8], [m["grad_norm"] for m in m1], rtol=1e-6)
    assert eight.trainable["w"].sharding.is_fully_replicated
    with pytest.raises(ValueError, match="--batch-size 6 is not divisible by the 8 devices"):
        S.check_batch(Layout(make_mesh()), config, 6)


def test_bf16_keeps_fp32_master_params_and_optimizer_state():
    config = S.StepConfig(steps=5, learning_rate=0.1, lr_warmup_steps=0, mixed_precision="bf16")
    state, metrics = _run(config, _batch(4), steps=2)
    leaves = jax.tree.leaves((state.trainable, state.opt_state, state.ema))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in leaves)
    assert np.isfinite(metrics[-1]["loss"])
    ref, _ = _run(S.StepConfig(steps=5, learning_rate=0.1, lr_warmup_steps=0), _batch(4), steps=2)
    np.testing.assert_allclose(np.asarray(state.trainable["w"]), np.asarray(ref.trainable["w"]), atol=2e-2)


def test_bad_step_options_are_refused():
    with pytest.raises(ValueError, match="--lr-scheduler"):
        S.StepConfig(steps=1, lr_scheduler="polynomial")
    with pytest.raises(ValueError, match="--mixed-precision"):
        S.StepConfig(steps=1, mixed_precision="fp16")


def _close_trees(got, want):
    """Equal to float32 rounding: XLA fuses and orders the rematerialised backward pass differently, so
    entries agree to 1e-5 relative, or to 1e-5 of the largest gradient (some gradients are zero up to
    rounding, e.g. of a bias followed by a group norm; on one CPU of ours two such entries of the UNet's
    differed by 1.9e-6 of the largest gradient, so 1e-6 was too tight)."""
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale), got, want)


def test_remat_changes_no_number(fast_compile):
    """UNet and prior blocks rematerialised: the same outputs and gradients (float32)."""
    from unclip_jax.models import prior, unet
    from unclip_jax.tiny import CONFIGS

    # One cross-attention block each way: the smallest UNet whose backward pass crosses every block kind.
    cfg = unet.UNet2DConditionConfig.from_dict(dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[8], norm_num_groups=4,
        down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"], cross_attention_dim=8,
        attention_head_dim=2))
    model = unet.UNet2DConditionModel(cfg)
    inputs = unet.dummy_inputs(cfg, batch=2)
    rng = np.random.default_rng(0)
    inputs = tuple(jnp.asarray(rng.normal(size=np.shape(x)).astype(np.float32)) if np.ndim(x) else x for x in inputs)
    params = model.init(jax.random.key(0), *inputs)["params"]

    def loss(p, m):
        return jnp.mean(m.apply({"params": p}, *inputs) ** 2)

    plain = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, model)
    remat = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, model.clone(remat=True))
    np.testing.assert_allclose(float(remat[0]), float(plain[0]), rtol=1e-6)
    _close_trees(remat[1], plain[1])

    pc = prior.PriorTransformerConfig.from_dict(CONFIGS["unclip"][1]["prior"])
    pmodel = prior.PriorTransformer(pc)
    args = tuple(jnp.asarray(rng.normal(size=np.shape(x)).astype(np.float32)) if jnp.issubdtype(x.dtype, jnp.floating)
                 else x for x in prior.dummy_prior_inputs(pc, batch=2))
    pparams = pmodel.init(jax.random.key(1), *args)["params"]

    def ploss(p, m):
        return jnp.mean(m.apply({"params": p}, *args) ** 2)

    a = jax.jit(jax.value_and_grad(ploss), static_argnums=1)(pparams, pmodel)
    r = jax.jit(jax.value_and_grad(ploss), static_argnums=1)(pparams, pmodel.clone(remat=True))
    np.testing.assert_allclose(float(r[0]), float(a[0]), rtol=1e-6)
    _close_trees(r[1], a[1])
