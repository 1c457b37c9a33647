"""Sharded sampling on 8 (forced CPU) devices: every pipeline gives, split over a mesh, the images it gives
on one device (batches of 8 and 16, params replicated or FSDP-sharded, batches the mesh does not divide),
and the compiled programs hold the intended shardings."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from unclip_jax.pipelines import depth2img, stable_unclip
from unclip_jax.sharding import FSDP, Layout, make_mesh, shard_params

TOL = 1e-5  # max abs difference, relative to the output scale (at least 1)
PER_PROMPT = 2


@pytest.fixture(scope="module")
def meshes():
    devices = jax.devices()
    assert len(devices) >= 8, "needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)"
    return {"replicated": Mesh(np.asarray(devices[:8]), ("data",)), "fsdp": make_mesh(fsdp=4, devices=devices[:8])}


def _rows(inputs, batch_axis, n):
    """The inputs of the first n batch rows."""
    return inputs.replace(**{k: jnp.take(v, jnp.arange(n), axis=batch_axis[k])
                             for k, v in inputs.as_dict().items() if v is not None and k in batch_axis})


def _prepare(kind, pipe, params, batch):
    """(inputs, config, batch axes) for `batch` rows (batch / 2 prompts, 2 images each), 2 steps, 16 x 16,
    guidance on, in-loop noise (DDIM eta > 0; the txt2img prior's DDPM)."""
    n = batch // PER_PROMPT
    prompts = [f"prompt {i}" for i in range(n)]
    common = dict(params=params, key=jax.random.key(batch), num_inference_steps=2, guidance_scale=3.0,
                  num_images_per_prompt=PER_PROMPT)
    if kind == "unclip":
        inputs, config = pipe.prepare(prompts, height=16, width=16, prior_num_inference_steps=2, noise_level=30,
                                      eta=0.5, **common)
        return inputs, config, pipe.BATCH_AXIS
    if kind == "unclip_img2img":
        embeds = np.random.RandomState(batch).randn(n, 32).astype(np.float32)
        inputs, config = pipe.prepare(image_embeds=embeds, prompt=prompts, height=16, width=16, noise_level=30,
                                      eta=0.5, **common)
        return inputs, config, stable_unclip.DECODER_BATCH_AXIS
    image = PIL.Image.fromarray(np.random.RandomState(batch).randint(0, 256, (16, 16, 3), dtype=np.uint8))
    inputs, config = pipe.prepare(prompts, image, strength=1.0, eta=0.5, **common)
    return inputs, config, depth2img.BATCH_AXIS


@pytest.fixture(scope="module")
def cases(pipeline_pairs):
    """Per pipeline: (pipe, params, inputs of 16 rows, config, batch axes, the 16 single-device images).
    Rows are independent (random draws included), so the first 8 rows are also the 8-row reference."""
    out = {}

    def get(kind):
        if kind not in out:
            _, pipe, params = pipeline_pairs(kind, "a")
            inputs, config, axes = _prepare(kind, pipe, params, 16)
            key = jax.random.key(7)
            out[kind] = (pipe, params, inputs, config, axes, np.asarray(pipe.sample(params, inputs, key, config=config)))
        return out[kind]

    return get


# Each pipeline runs both batch sizes and both param layouts (and a batch the 8 devices do not divide,
# which reuses the 8-row program); the full cross product would cost twice the compiles for no new path.
CASES = [(kind, batch, mode) for kind, (mode8, mode16) in
         {"unclip": ("fsdp", "replicated"), "unclip_img2img": ("replicated", "fsdp"),
          "depth2img": ("fsdp", "replicated")}.items()
         for batch, mode in ((8, mode8), (16, mode16), (6, mode8))]


@pytest.mark.parametrize("kind, batch, mode", CASES)
def test_sharded_equals_single_device(cases, meshes, kind, batch, mode):
    pipe, params, inputs, config, axes, expected = cases(kind)
    mesh = meshes[mode]
    out = pipe.sample(params, _rows(inputs, axes, batch), jax.random.key(7), config=config, mesh=mesh)
    assert out.shape == expected[:batch].shape
    if batch % 8 == 0:  # not trimmed: the rows are still split over every batch device
        axes_of_mesh = ("data",) if mode == "replicated" else ("data", FSDP)
        assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(axes_of_mesh)), out.ndim), out.sharding
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(np.asarray(out) - expected[:batch]).max())
    print(f"{kind} batch {batch} {mode}: max abs difference {err:.2g} (output scale {scale:.2g})")
    assert err <= TOL * scale, err


def test_call_with_mesh_gives_the_single_device_images(cases, meshes):
    """The public path: `pipe(..., mesh=mesh)` equals `pipe(...)` (the static configuration of the
    img2img cases above, so their compiled programs serve)."""
    pipe, params, *_ = cases("unclip_img2img")
    image = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 20, 3), dtype=np.uint8))
    kw = dict(params=params, key=jax.random.key(3), height=16, width=16, num_inference_steps=2, guidance_scale=3.0,
              noise_level=10, eta=0.5, num_images_per_prompt=PER_PROMPT, output_type="np")
    prompts = [f"prompt {i}" for i in range(8)]
    single = pipe(image, prompts, **kw).images
    sharded = pipe(image, prompts, mesh=meshes["fsdp"], **kw).images
    assert sharded.shape == single.shape == (16, 16, 16, 3)
    np.testing.assert_allclose(sharded, single, atol=TOL)


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_compiled_shardings(cases, meshes, mode):
    """The whole sample as one compiled program: batch inputs and the images split over the batch axes;
    params replicated (and then no step communicates: no collective at all in the program) or FSDP-sharded
    (large params split over `fsdp`, gathered where used)."""
    pipe, params, inputs, config, axes, _ = cases("unclip_img2img")
    mesh = meshes[mode]
    layout = Layout(mesh)
    inputs = _rows(inputs, axes, 8)
    placed = shard_params({k: params[k] for k in pipe.SAMPLE_MODELS}, mesh)
    placed_inputs = type(inputs).from_dict(layout.put_inputs(inputs.as_dict(), axes, 8))
    fn = jax.jit(lambda p, i, k: pipe.sample(p, i, k, config=config, mesh=mesh))
    compiled = fn.lower(placed, placed_inputs, jax.random.key(7)).compile()
    param_shardings, input_shardings, _ = compiled.input_shardings[0]
    batch = layout.batch()
    assert compiled.output_shardings.is_equivalent_to(batch, 4)
    assert input_shardings.latents.is_equivalent_to(batch, 4)
    assert input_shardings.prompt_embeds.is_equivalent_to(batch, 3)
    assert input_shardings.guidance_scale.is_fully_replicated
    leaves = jax.tree.leaves(param_shardings)
    split = [s for s in leaves if not s.is_fully_replicated]
    hlo = compiled.as_text()
    collectives = [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute") if op in hlo]
    if mode == "replicated":
        assert not split
        assert not collectives, collectives
    else:
        kernel = param_shardings["unet"]["conv_in"]["kernel"]
        assert kernel.spec == P(None, None, None, FSDP), kernel.spec  # [3, 3, C_in, 32]: the output channels
        assert len(split) > len(leaves) // 3, (len(split), len(leaves))
        assert "all-gather" in collectives


def test_mesh_errors(cases):
    pipe, params, inputs, config, *_ = cases("unclip_img2img")
    bad = Mesh(np.asarray(jax.devices()[:2]), ("batch",))
    with pytest.raises(ValueError, match="'data' axis"):
        pipe.sample(params, inputs, jax.random.key(0), config=config, mesh=bad)
    with pytest.raises(ValueError, match="fsdp=3 does not divide the 8 devices"):
        make_mesh(fsdp=3, devices=jax.devices()[:8])


_TWO_HOSTS = r'''
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import os
from pathlib import Path

import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2, process_id=int(sys.argv[1]),
                           initialization_timeout=60)
import numpy as np
from unclip_jax.sharding import Layout, make_mesh, place, to_host

layout = Layout(make_mesh(fsdp=2))  # 2 x 2 over the 8 devices of both processes
x = np.arange(18, dtype=np.float32).reshape(6, 3)
inputs = layout.put_inputs({"x": x, "scale": np.float32(2.0)}, {"x": 0}, 6)  # 6 rows padded to 8
params = layout.put_params({"w": np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32)})
key = place(jax.random.key(0), layout.replicated())
y = jax.jit(lambda p, i, k: layout.constrain(i["x"] @ p["w"][:3] * i["scale"] + jax.random.normal(k, (8, 32))))(
    params, inputs, key)
out = to_host(y[:6])
want = x @ np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32)[:3] * 2
want = want + np.asarray(jax.random.normal(jax.random.key(0), (8, 32)))[:6]
assert not y.is_fully_addressable and out.shape == (6, 32), (y.is_fully_addressable, out.shape)
assert params["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp"), params["w"].sharding.spec
print("ok", jax.process_index(), float(np.abs(out - want).max()))
'''


def test_two_processes(tmp_path):
    """Multi-host on one machine: two processes joined by `jax.distributed` (gloo collectives over loopback)
    place identical host inputs and FSDP params on a mesh spanning both, run a sharded program, and each
    gets the whole result back."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "host.py"
    script.write_text(_TWO_HOSTS)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    procs = [subprocess.Popen([sys.executable, str(script), str(i), f"127.0.0.1:{port}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:]
        line = [ln for ln in out.splitlines() if ln.startswith("ok")][-1]
        assert line.startswith(f"ok {i}") and float(line.split()[-1]) <= 1e-5, line
