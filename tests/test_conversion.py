"""Conversion into orbax folders: bit-identical images after the round trip for all three pipelines, the
command (module and script) with its dtypes and one-line errors, atomic writes under SIGKILL, params
restored straight into a sharding, and a torch-free runtime."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import PIL.Image
import pytest

import unclip_jax as uj
from unclip_jax.conversion import PAUSE_ENV, convert_pipeline
from unclip_jax.weights.orbax_io import saved_structure

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = {"unclip": uj.StableUnCLIPPipeline, "unclip_img2img": uj.StableUnCLIPImg2ImgPipeline,
             "depth2img": uj.StableDiffusionDepth2ImgPipeline}


def _image(seed=0, hw=(32, 32)):
    return PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, hw + (3,), dtype=np.uint8))


def _generate(kind, pipe, params):
    """Two steps of each loop, a fixed key, every input the same on both sides."""
    kw = dict(params=params, key=jax.random.key(3), num_inference_steps=2, output_type="np")
    if kind == "unclip":
        return pipe("a red fox", height=32, width=32, prior_num_inference_steps=2, noise_level=7, **kw).images
    if kind == "unclip_img2img":
        return pipe(_image(1), prompt="a red fox", height=32, width=32, noise_level=7, **kw).images
    return pipe("a red fox", image=_image(2), strength=0.75, **kw).images


def _run(*args, env=None, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})), **kw)


def _leaves_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def converted(pipeline_dirs, tmp_path_factory):
    """kind -> (diffusers folder, orbax folder converted in this process, fp32)."""
    root = tmp_path_factory.mktemp("converted")
    return {kind: (str(pipeline_dirs(kind, "a")),
                   convert_pipeline(str(pipeline_dirs(kind, "a")), str(root / kind), progress=False))
            for kind in PIPELINES}


TORCH_FREE = """
import sys, numpy as np, unclip_jax as uj
sys.path.insert(0, sys.argv[3])
import test_conversion
kind, folder = sys.argv[1], sys.argv[2]
pipe, params = test_conversion.PIPELINES[kind].from_pretrained(folder)
np.save(sys.argv[4], test_conversion._generate(kind, pipe, params))
assert "torch" not in sys.modules, "torch was imported"
"""


@pytest.mark.parametrize("kind", list(PIPELINES))
def test_round_trip_gives_bit_identical_images(converted, kind, tmp_path):
    """The converted folder loads to the same params and makes the same images, bit for bit. For the
    text-to-image pipeline the converted side runs in a fresh process, which must never import torch."""
    source, out = converted[kind]
    cls = PIPELINES[kind]
    direct, direct_params = cls.from_pretrained(source)
    expected = _generate(kind, direct, direct_params)
    assert expected.shape[0] == 1 and expected.dtype == np.float32
    if kind == "unclip":
        r = _run("-c", TORCH_FREE, kind, out, str(Path(__file__).parent), str(tmp_path / "images.npy"))
        assert r.returncode == 0, r.stderr
        images = np.load(tmp_path / "images.npy")
    else:
        saved, saved_params = cls.from_pretrained(out)
        assert _leaves_equal(saved_params, direct_params)
        images = _generate(kind, saved, saved_params)
    assert np.array_equal(images, expected)


def _restore_all(folder: str) -> dict:
    return {p.parent.name: uj.restore_params(str(p)) for p in sorted(Path(folder).glob("*/orbax_params"))}


def test_command_dtypes_and_script(converted, tmp_path):
    """`unclip-jax convert` and `convert/convert_checkpoint.py`: the params are saved in the dtype asked for,
    rounded from the fp32 checkpoint; the folder goes to stdout, and no progress bar into a pipe (a log)."""
    source, fp32 = converted["unclip_img2img"]
    r = _run("-m", "unclip_jax.cli", "convert", source, str(tmp_path / "bf16"), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "bf16") and "component" not in r.stderr  # tqdm's unit
    r = _run("convert/convert_checkpoint.py", source, str(tmp_path / "fp16"), "--dtype", "fp16", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    reference = _restore_all(fp32)
    assert set(reference) == {"image_encoder", "image_normalizer", "text_encoder", "unet", "vae"}
    for name, dtype in (("bf16", ml_dtypes.bfloat16), ("fp16", np.float16)):
        assert _leaves_equal(_restore_all(str(tmp_path / name)),
                             jax.tree.map(lambda x: np.asarray(x).astype(dtype), reference)), name


@pytest.mark.parametrize("case", ["unsupported class", "out exists", "no source", "no such variant",
                                  "already converted", "bad dtype"])
def test_user_errors_are_one_line(converted, tmp_path, case):
    source, out = converted["unclip"]
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    new = str(tmp_path / "new")
    args, message = {
        "unsupported class": ((str(other), new), "pipeline class 'StableDiffusionPipeline' is not supported"),
        "out exists": ((source, out), "already exists (pass --overwrite to replace it)"),
        "no source": (("/nonexistent/pipeline", new), "/nonexistent/pipeline: no such pipeline folder"),
        "no such variant": ((source, new, "--variant", "fp8"), "no component has weights of variant 'fp8'"),
        "already converted": ((out, new), "prior_text_encoder: no weights: expected one of"),
        "bad dtype": ((source, new, "--dtype", "fp8"), "argument --dtype: invalid choice: 'fp8'"),
    }[case]
    r = _run("-m", "unclip_jax.cli", "convert", *args, "--quiet")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("unclip-jax convert: error: "), r.stderr
    assert message in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]  # nothing written, not even a partial folder


def _convert_and_kill(source: str, out: Path, *extra: str) -> None:
    """Starts a conversion that pauses after each component, and SIGKILLs it once the first component
    is written into its temporary folder."""
    proc = subprocess.Popen([sys.executable, "-m", "unclip_jax.cli", "convert", source, str(out), "--quiet", *extra],
                            cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", **{PAUSE_ENV: "60"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not any(p.name.startswith(f".{out.name}.partial-") and any(p.iterdir()) for p in out.parent.iterdir()):
            assert proc.poll() is None and time.time() < deadline, "the conversion never started writing"
            time.sleep(0.05)
        time.sleep(0.5)
        assert proc.poll() is None, "the conversion ended before it was killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_killed_conversion_leaves_nothing_and_spares_a_previous_output(converted, tmp_path):
    source, good = converted["depth2img"]
    out = tmp_path / "out"
    _convert_and_kill(source, out)
    assert not out.exists()
    with pytest.raises(uj.CheckpointError, match="no such pipeline folder"):
        uj.StableDiffusionDepth2ImgPipeline.from_pretrained(str(out))
    # Over a previous good output: killed midway with --overwrite, the old output is intact.
    _, before = uj.StableDiffusionDepth2ImgPipeline.from_pretrained(good)
    _convert_and_kill(source, Path(good), "--overwrite", "--dtype", "fp16")
    _, after = uj.StableDiffusionDepth2ImgPipeline.from_pretrained(good)
    assert _leaves_equal(after, before)


def test_overwrite_replaces_the_output(converted, tmp_path):
    source, _ = converted["unclip_img2img"]
    out = tmp_path / "out"
    convert_pipeline(source, str(out), dtype="fp16", progress=False)
    with pytest.raises(FileExistsError):
        convert_pipeline(source, str(out), progress=False)
    convert_pipeline(source, str(out), dtype="bf16", overwrite=True, progress=False)
    dtypes = {x.dtype for x in jax.tree.leaves(saved_structure(str(out / "unet" / "orbax_params")))}
    assert dtypes == {np.dtype(ml_dtypes.bfloat16)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or old folder left behind


def check_sharding(orbax: str, diffusers: str) -> None:
    """Loads with a replicated sharding and a per-param callable (split kernels) on 8 devices."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() >= 8, jax.device_count()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    replicated = NamedSharding(mesh, P())

    def split_last(component, path, x):
        # Kernels whose output axis divides over the devices are split along it; the rest replicated.
        if path.endswith("kernel") and x.shape[-1] % 8 == 0:
            return NamedSharding(mesh, P(*([None] * (len(x.shape) - 1)), "data"))
        return replicated

    _, plain = uj.StableUnCLIPImg2ImgPipeline.from_pretrained(orbax)
    for folder, sharding in ((orbax, replicated), (orbax, split_last), (diffusers, split_last)):
        _, params = uj.StableUnCLIPImg2ImgPipeline.from_pretrained(folder, sharding=sharding)
        split = 0
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            name = "/".join(str(k.key) for k in path[1:])
            want = sharding if sharding is replicated else split_last(path[0].key, name, x)
            assert x.sharding.is_equivalent_to(want, x.ndim), (folder, name, x.sharding)
            split += not x.sharding.is_fully_replicated
        assert (split > 10) == (sharding is split_last), (folder, split)
        assert _leaves_equal(params, plain), folder


def test_params_restored_into_a_sharding(converted):
    """On 8 (forced CPU) devices, orbax params are read straight into the sharding asked for, and
    converted ones placed after conversion; a single sharding or a per-param callable."""
    source, out = converted["unclip_img2img"]
    if jax.device_count() >= 8:
        check_sharding(out, source)
        return
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_conversion; test_conversion.check_sharding(*sys.argv[2:])"
    flags = os.environ.get("XLA_FLAGS", "")
    r = _run("-c", code, str(Path(__file__).parent), out, source,
             env={"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=8"})
    assert r.returncode == 0, r.stderr
