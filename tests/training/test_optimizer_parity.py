"""optax AdamW (the training machinery's default) against torch.optim.AdamW on the same gradients, with
diffusers' script defaults (b1 0.9, b2 0.999, eps 1e-8, weight decay 1e-2) at diffusers' learning rates
(1e-4 text-to-image and LoRA, 5e-4 textual inversion) and a large one: params equal within 1e-6 relative
after every step of five.

The updates themselves (param after - param before) agree to about 1e-5 of their size, not better: optax
computes the bias corrections 1 - b^t in float32 (1 - 0.999 is off by 1.3e-5 relative there), torch in
Python's float64. That is asserted too at the large learning rate (UPDATE_TOL), so a change in either is
seen (smaller updates are below the resolution of float32 params of size ~1)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

TOL = 1e-6
UPDATE_TOL = 2e-5


@pytest.mark.parametrize("lr,weight_decay", [(1e-4, 1e-2), (5e-4, 1e-2), (0.01, 0.3)])
def test_adamw_matches_torch(lr, weight_decay):
    rng = np.random.default_rng(0)
    shapes = {"kernel": (7, 5), "bias": (5,), "scale": ()}
    params = {k: np.asarray(rng.normal(size=s), np.float32) for k, s in shapes.items()}
    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    torch_opt = torch.optim.AdamW(list(torch_params.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=weight_decay)
    opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    ours = {k: jnp.asarray(v) for k, v in params.items()}
    state = opt.init(ours)
    worst = worst_update = 0.0
    for step in range(5):
        # Gradients of mixed scale, tiny ones included (where eps matters).
        grads = {k: np.asarray(rng.normal(size=s) * 10.0 ** rng.integers(-6, 2), np.float32) for k, s in shapes.items()}
        for k, p in torch_params.items():
            p.grad = torch.from_numpy(grads[k].copy())
        before = {k: p.detach().numpy().copy() for k, p in torch_params.items()}
        torch_opt.step()
        updates, state = opt.update({k: jnp.asarray(g) for k, g in grads.items()}, state, ours)
        ours = optax.apply_updates(ours, updates)
        for k in shapes:
            expected = torch_params[k].detach().numpy()
            err = float(np.abs(np.asarray(ours[k]) - expected).max() / max(np.abs(expected).max(), 1e-30))
            worst = max(worst, err)
            assert err <= TOL, f"step {step} {k}: relative error {err:.2e}"
            ref_update = expected.astype(np.float64) - before[k]
            update_err = float(np.abs(np.asarray(updates[k], np.float64) - ref_update).max() / np.abs(ref_update).max())
            worst_update = max(worst_update, update_err)
            if lr >= 1e-2:  # smaller updates are not resolved by float32 params of size ~1
                assert update_err <= UPDATE_TOL, f"step {step} {k}: update relative error {update_err:.2e}"
    print(f"adamw lr {lr} wd {weight_decay}: params {worst:.2e}, updates {worst_update:.2e} relative")
