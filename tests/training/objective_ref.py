"""Test-side helpers for the objectives' parity tests: torch grads as our params (through the same
conversion rules that convert state dicts), and the comparison that reports the worst difference."""

from __future__ import annotations

import numpy as np
import torch
from flax import traverse_util

from torch_ref import nhwc_to_nchw, to_numpy
from unclip_jax.weights import components
from unclip_jax.weights.checkpoint import read_config
from unclip_jax.weights.convert import convert


def rules_of(folder) -> object:
    """The conversion rules of the component saved in `folder`."""
    return components.build(read_config(str(folder))).rules


def torch_grads(module: torch.nn.Module, our_params, rules, keep: tuple[str, ...] = ("",)) -> dict:
    """module's parameter grads (zeros where None) of the names starting with one of `keep`, converted to
    our param layout as convert() converts weights (a grad transforms like the weight it belongs to)."""
    state = {}
    for name, p in module.named_parameters():
        if name.startswith(keep):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            state[name] = to_numpy(g)
    abstract = _abstract(our_params)
    return convert(state, abstract, rules, what="grads")


def _abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), tree)


def worst_relative(ours, ref) -> float:
    """max over leaves of max |ours - ref|, relative to the largest |ref| of the whole tree (a leaf whose
    grads are tiny next to the others is compared on the tree's scale); trees must match exactly."""
    a = traverse_util.flatten_dict(ours)
    b = traverse_util.flatten_dict(ref)
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:10]
    scale = max(float(np.abs(np.asarray(v)).max()) for v in b.values())
    assert scale > 0
    err = max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max()) for k in a)
    return err / scale


def worst_leaf_relative(ours, ref, floor: float = 1e-3) -> float:
    """max over leaves of max |ours - ref| / max |ref_leaf|, leaves whose scale is below `floor` times the
    tree's scale compared on that floor."""
    a = traverse_util.flatten_dict(ours)
    b = traverse_util.flatten_dict(ref)
    scale = max(float(np.abs(np.asarray(v)).max()) for v in b.values())
    worst = 0.0
    for k in a:
        leaf = max(float(np.abs(np.asarray(b[k])).max()), floor * scale)
        worst = max(worst, float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max()) / leaf)
    return worst


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check_parity(label: str, loss, ref_loss, grads, ref_grads, *, tol: float, grad_tol: float | None = None,
                 extra: str = "") -> dict[str, float]:
    """Our loss and grads (a param tree) against PyTorch's: prints the errors (`extra` appended) and asserts
    the loss within `tol` relative and the grads within `grad_tol` (default `tol`) by `worst_relative`.
    Returns {"loss", "grad", "leaf"} (leaf: `worst_leaf_relative`, reported only)."""
    errs = {"loss": relative(loss, to_numpy(ref_loss)), "grad": worst_relative(grads, ref_grads),
            "leaf": worst_leaf_relative(grads, ref_grads)}
    print(f"{label}: loss rel {errs['loss']:.2e}, grad rel {errs['grad']:.2e} (per leaf {errs['leaf']:.2e}){extra}")
    grad_tol = tol if grad_tol is None else grad_tol
    assert errs["loss"] <= tol, f"{label}: loss rel {errs['loss']:.2e} > {tol}"
    assert errs["grad"] <= grad_tol, f"{label}: grad rel {errs['grad']:.2e} > {grad_tol}"
    return errs


def nchw(x) -> torch.Tensor:
    return nhwc_to_nchw(np.asarray(x))


def t(x, dtype=None) -> torch.Tensor:
    x = np.asarray(x)
    return torch.from_numpy(np.array(x if dtype is None else x.astype(dtype)))


def random_examples(n: int, size: int, seed: int, captions=("a red cube on a table", "two birds")) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "text": captions[i % len(captions)]}
            for i in range(n)]
