"""The side-by-side benchmark (benchmarks/bench.py, outside the package) in its tiny mode and its one-line
refusals, and the CPU attention path it made the default: cache-sized query blocks give
jax.nn.dot_product_attention's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_ref import assert_close

from unclip_jax.models import attention as attention_module

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_tiny_benchmark_prints_ratios(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--reps", "1", "--pipeline-reps", "2",
         "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert text.count("ratio jax/diffusers") == 2, text
    assert "unet step (batch 2, 16x16 latents)" in text and "pipeline txt2img" in text, text
    # The pipeline's later calls with the same static configuration hit the compiled programs.
    assert "recompiles on later calls: 0" in text, text
    results = json.loads(out.read_text())
    for what, reps in (("unet", 1), ("pipeline", 2)):
        for side in ("jax", "diffusers"):
            r = results[what][side]
            assert len(r["times_s"]) == reps and r["median_s"] > 0 and r["peak_rss_mb"] > 0, (what, side, r)
    assert results["pipeline"]["jax"]["recompiles"] == 0
    assert results["unet"]["jax"]["xla_temp_mb"] >= 0 and results["unet"]["jax"]["compile_s"] > 0
    assert results["versions"]["backend"] == "cpu" and "diffusers" in results["versions"]


# Runs the script with `hidden` modules made unimportable (as on a machine without them).
_HIDING = ("import runpy, sys\nfor name in filter(None, sys.argv[2].split(',')):\n    sys.modules[name] = None\n"
           "sys.argv = [sys.argv[1], *sys.argv[3:]]\nrunpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.parametrize("args,hidden,message", [
    (("--what", "vae"), "", "--what: unknown"),
    (("--tiny",), "diffusers", "the diffusers side needs diffusers, not installed here"),
    (("--configs", "/nonexistent"), "", "--configs /nonexistent: unet_sd21_unclip.json not found"),
    (("--tiny", "--size", "33"), "", "--size must be a positive multiple of 4"),
])
def test_bad_arguments_are_refused(args, hidden, message):
    proc = subprocess.run([sys.executable, "-c", _HIDING, str(BENCH), hidden, *args], capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("python benchmarks/bench.py: error: "), proc.stderr


def _qkv(b, t, s, n, h, seed, dtype=np.float32):
    rng = np.random.RandomState(seed)
    return tuple(jnp.asarray(rng.randn(b, x, n, h).astype(np.float32), dtype) for x in (t, s, s))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the blocked path is the CPU default")
@pytest.mark.parametrize("t,s,causal,mask_kind", [
    (37, 37, True, None), (37, 37, False, "keys"), (50, 20, False, "full"), (33, 33, True, "keys"), (9, 300, False, None),
])
def test_cpu_blocked_attention_equals_dot_product_attention(monkeypatch, t, s, causal, mask_kind):
    # A small logits budget forces several blocks (and a ragged last one) on these small shapes.
    monkeypatch.setattr(attention_module, "_CPU_LOGITS_BYTES", 2 * 16 * 2 * 3 * s * 4)
    q, k, v = _qkv(2, t, s, 3, 8, seed=t + s)
    rng = np.random.RandomState(1)
    mask = {None: None, "keys": rng.rand(2, 1, 1, s) > 0.3, "full": rng.rand(2, 3, t, s) > 0.4}[mask_kind]
    if mask is not None:
        mask[..., 0] = True
        mask = jnp.asarray(mask)
    assert attention_module._cpu_block_size(2, 3, t, s) < t or t <= 16
    ours = jax.jit(lambda q, k, v: attention_module.attention(q, k, v, mask=mask, is_causal=causal))(q, k, v)
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    assert_close(ours, ref, 1e-6, f"t={t} s={s} causal={causal} mask={mask_kind}")


def test_cpu_blocked_attention_bf16_and_fully_masked_rows():
    q, k, v = _qkv(1, 20, 20, 2, 8, seed=3, dtype=jnp.bfloat16)
    out = attention_module.attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = jax.nn.dot_product_attention(q, k, v)
    assert_close(np.asarray(out, np.float32), np.asarray(ref, np.float32), 2e-2, "bf16")
    # A row whose keys are all masked gets uniform weights (jax.nn.dot_product_attention's choice), not NaN.
    q, k, v = _qkv(1, 4, 6, 1, 8, seed=4)
    mask = jnp.ones((1, 1, 4, 6), bool).at[0, 0, 1].set(False)
    out = attention_module.attention(q, k, v, mask=mask)
    assert_close(out, jax.nn.dot_product_attention(q, k, v, mask=mask), 1e-6, "fully masked row")
    assert_close(out[0, 1], jnp.broadcast_to(v[0].mean(0), (1, 8)), 1e-6, "uniform weights")
