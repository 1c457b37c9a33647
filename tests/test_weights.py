"""Checkpoint reading, conversion errors, dtypes, shards, .bin, orbax round trip, and a torch-free runtime."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from torch_ref import randomize_

from unclip_jax.weights.checkpoint import find_weight_files, load_state_dict
from unclip_jax.weights.components import load_component
from unclip_jax.weights.convert import Rules, abstract_params, convert, plan
from unclip_jax.weights.errors import CheckpointError, ConversionError
from unclip_jax.weights.orbax_io import restore_params, save_params
from unclip_jax.weights.safetensors_io import SafetensorsFile, read_header, save_file
from unclip_jax.weights.tree import check_tree


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    cfg = transformers.CLIPTextConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=300, max_position_embeddings=77,
                                      projection_dim=8)
    ref = randomize_(transformers.CLIPTextModelWithProjection(cfg), seed=3)
    folder = tmp_path_factory.mktemp("tiny_text")
    ref.save_pretrained(str(folder), safe_serialization=True)
    return ref, folder


def _copy(folder, dst):
    shutil.copytree(folder, dst)
    return dst


def _flat(params):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_safetensors_reader_matches_library(tiny_text, tmp_path):
    from safetensors.numpy import load_file

    _, folder = tiny_text
    path = str(folder / "model.safetensors")
    ours = SafetensorsFile(path)
    theirs = load_file(path)
    assert set(ours) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])
    # bf16 round trip through our writer (numpy has no bf16: ml_dtypes provides it).
    x = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    save_file({"x": x, "y": np.ones(2, np.float16)}, str(tmp_path / "b.safetensors"))
    back = SafetensorsFile(str(tmp_path / "b.safetensors"))
    assert back["x"].dtype == ml_dtypes.bfloat16 and np.array_equal(back["x"], x)
    import safetensors.torch
    assert torch.equal(safetensors.torch.load_file(str(tmp_path / "b.safetensors"))["x"],
                       torch.arange(12, dtype=torch.float32).reshape(3, 4).bfloat16())


def test_truncated_and_corrupt_files_name_the_file(tiny_text, tmp_path):
    _, folder = tiny_text
    data = (folder / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file: tensor"):
        read_header(str(bad))
    bad.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file \(5 bytes"):
        read_header(str(bad))
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"{not json!!!}   " + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        read_header(str(bad))
    # A component folder with a truncated file fails when loading, before any conversion work.
    comp = _copy(folder, tmp_path / "comp")
    (comp / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=str(comp / "model.safetensors")):
        load_component(str(comp))


def test_missing_files_are_named(tiny_text, tmp_path):
    _, folder = tiny_text
    comp = _copy(folder, tmp_path / "no_weights")
    os.remove(comp / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights: expected one of"):
        load_component(str(comp))
    comp = _copy(folder, tmp_path / "no_config")
    os.remove(comp / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_component(str(comp))
    with pytest.raises(CheckpointError, match="no such component folder"):
        load_component(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="variant 'fp16'"):
        find_weight_files(str(folder), variant="fp16")


def test_wrong_shape_and_extra_tensor_are_named(tiny_text, tmp_path):
    _, folder = tiny_text
    sd = dict(SafetensorsFile(str(folder / "model.safetensors")))
    sd["text_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((25, 16), np.float32)
    sd["text_model.encoder.layers.9.mlp.fc1.weight"] = np.zeros((24, 16), np.float32)
    del sd["text_model.final_layer_norm.bias"]
    comp = _copy(folder, tmp_path / "bad_shapes")
    save_file(sd, str(comp / "model.safetensors"))
    with pytest.raises(ConversionError) as e:
        load_component(str(comp))
    msg = str(e.value)
    assert "wrong shape (1): text_model.encoder.layers.1.mlp.fc1.weight (25, 16)" in msg
    assert "unexpected in the checkpoint (1): text_model.encoder.layers.9.mlp.fc1.weight" in msg
    assert "missing from the checkpoint (2): text_model/encoder/layers_1/mlp/fc1/kernel, " \
           "text_model/final_layer_norm/bias" in msg


def test_config_unsupported_value_is_named(tiny_text, tmp_path):
    _, folder = tiny_text
    comp = _copy(folder, tmp_path / "bad_act")
    cfg = json.loads((comp / "config.json").read_text())
    cfg["hidden_act"] = "swish_glu"
    (comp / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'hidden_act' = 'swish_glu' is not supported"):
        load_component(str(comp))
    cfg["architectures"] = ["CLIPSegModel"]
    (comp / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model class 'CLIPSegModel' is not supported"):
        load_component(str(comp))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_sharded_checkpoints(tiny_text, tmp_path, dtype):
    ref, folder = tiny_text
    _, base = load_component(str(folder))
    half = copy.deepcopy(ref).to(dtype)
    out = tmp_path / "sharded"
    half.save_pretrained(str(out), safe_serialization=True, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").exists() and len(find_weight_files(str(out))) > 1
    _, params = load_component(str(out))
    for k, v in _flat(params).items():
        assert v.dtype == np.float32
        expect = _flat(base)[k]
        np.testing.assert_array_equal(v, jnp.asarray(expect).astype(jnp.dtype(str(dtype).split(".")[1])).astype(jnp.float32),
                                      err_msg=k)
    # A shard named by the index but absent is named.
    os.remove(find_weight_files(str(out))[-1])
    with pytest.raises(CheckpointError, match="which is missing"):
        load_component(str(out))


def test_variant_shards_as_transformers_writes_them(tiny_text, tmp_path):
    """`save_pretrained(variant="fp16")` sharded: model.fp16-0000k-of-0000n.safetensors with
    model.safetensors.index.fp16.json, found by variant (and not without it)."""
    ref, folder = tiny_text
    _, base = load_component(str(folder))
    out = tmp_path / "variant"
    copy.deepcopy(ref).half().save_pretrained(str(out), safe_serialization=True, variant="fp16", max_shard_size="20KB")
    files = find_weight_files(str(out), variant="fp16")
    assert len(files) > 1 and all(".fp16-0" in os.path.basename(f) for f in files), files
    with pytest.raises(CheckpointError, match="no weights: expected one of"):
        find_weight_files(str(out))
    _, params = load_component(str(out), variant="fp16")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b).astype(np.float16).astype(np.float32)),
                 params, base)


def test_param_dtype(tiny_text):
    _, folder = tiny_text
    _, params = load_component(str(folder), param_dtype=jnp.bfloat16)
    assert {v.dtype for v in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}


def test_pickle_bin_only_without_safetensors(tiny_text, tmp_path):
    ref, folder = tiny_text
    _, base = load_component(str(folder))
    comp = _copy(folder, tmp_path / "bin")
    torch.save(ref.state_dict(), comp / "pytorch_model.bin")
    assert find_weight_files(str(comp)) == [str(comp / "model.safetensors")]  # safetensors first
    os.remove(comp / "model.safetensors")
    assert find_weight_files(str(comp)) == [str(comp / "pytorch_model.bin")]
    _, params = load_component(str(comp))
    jax.tree.map(np.testing.assert_array_equal, params, base)
    # weights-only loading: a pickle carrying arbitrary objects is refused, naming the file.
    torch.save({"x": torch.zeros(2), "evil": object()}, comp / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot load as a weights-only"):
        load_state_dict(str(comp))


def test_orbax_round_trip(tiny_text, tmp_path):
    _, folder = tiny_text
    module, params = load_component(str(folder))
    save_params(str(tmp_path / "ckpt"), params)
    back = restore_params(str(tmp_path / "ckpt"))
    jax.tree.map(np.testing.assert_array_equal, back, params)
    # Restoring into a target with an explicit sharding places the arrays there.
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), params)
    placed = restore_params(str(tmp_path / "ckpt"), target)
    assert all(x.sharding == dev for x in jax.tree.leaves(placed))
    with pytest.raises(CheckpointError, match="no orbax checkpoint"):
        restore_params(str(tmp_path / "absent"))


def test_plan_needs_shapes_only():
    """A real-size plan allocates nothing: shapes go in, steps come out."""
    import flax.linen as nn

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4096, (3, 3), name="conv")(x)
            return nn.Dense(4096, name="proj")(nn.LayerNorm(name="norm")(x))

    abstract = abstract_params(M(), jnp.zeros((1, 8, 8, 4096)))
    steps = plan({"conv.weight": (4096, 4096, 3, 3), "conv.bias": (4096,), "proj.weight": (4096, 4096, 1, 1),
                  "proj.bias": (4096,), "norm.weight": (4096,), "norm.bias": (4096,)}, abstract, Rules())
    assert {"/".join(s.target) for s in steps} == {"conv/kernel", "conv/bias", "proj/kernel", "proj/bias",
                                                   "norm/scale", "norm/bias"}
    # conv layout [O, I, kh, kw] -> [kh, kw, I, O]; a 1x1 conv feeding a Dense becomes its transpose.
    rng = np.random.RandomState(0)
    sd = {"conv.weight": rng.randn(5, 3, 2, 2).astype(np.float32), "conv.bias": np.zeros(5, np.float32),
          "proj.weight": rng.randn(6, 5, 1, 1).astype(np.float32), "proj.bias": np.zeros(6, np.float32),
          "norm.weight": np.ones(5, np.float32), "norm.bias": np.zeros(5, np.float32)}

    class Small(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(5, (2, 2), name="conv")(x)
            return nn.Dense(6, name="proj")(nn.LayerNorm(name="norm")(x))

    params = convert(sd, abstract_params(Small(), jnp.zeros((1, 4, 4, 3))), Rules())
    np.testing.assert_array_equal(params["conv"]["kernel"], sd["conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["proj"]["kernel"], sd["proj.weight"][:, :, 0, 0].T)


def test_runtime_never_imports_torch():
    code = ("import sys, unclip_jax, unclip_jax.weights.components, unclip_jax.tokenizer, "
            "unclip_jax.image_processing; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_tree_names_every_mismatch_with_shapes():
    want = {"a": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32), "bias": jax.ShapeDtypeStruct((4,), jnp.float32)},
            "b": {"scale": jax.ShapeDtypeStruct((4,), jnp.float32)}}
    check_tree({"a": {"kernel": np.zeros((3, 4)), "bias": np.zeros(4)}, "b": {"scale": np.ones(4)}}, want, "unet")
    bad = {"a": {"kernel": np.zeros((4, 3)), "bias": np.zeros(4)}, "c": {"scale": np.ones(4)}}
    with pytest.raises(ConversionError) as e:
        check_tree(bad, want, "unet")
    assert e.value.missing == ["b/scale"] and e.value.unexpected == ["c/scale"]
    assert e.value.misshaped == ["a/kernel (4, 3), expected (3, 4)"]
    msg = str(e.value)
    assert msg.startswith("unet: the params do not match the model.")
    assert "missing from the params (1): b/scale" in msg and "a/kernel (4, 3), expected (3, 4)" in msg
    # Errors are ValueErrors and importable from the package top and from where they were defined before.
    import unclip_jax
    from unclip_jax.weights import safetensors_io
    assert unclip_jax.ConversionError is ConversionError and safetensors_io.CheckpointError is CheckpointError
    assert issubclass(ConversionError, ValueError) and issubclass(CheckpointError, ValueError)


def test_one_loader_for_orbax_and_pytorch(tiny_text, tmp_path):
    """load_component reads a folder's orbax params when it has them (checked against the config with the
    same check, cast to `param_dtype` when asked), else its PyTorch weights."""
    _, folder = tiny_text
    module, params = load_component(str(folder))
    comp = tmp_path / "orbax_text"
    comp.mkdir()
    shutil.copy(folder / "config.json", comp / "config.json")
    save_params(str(comp / "orbax_params"), params)
    _, back = load_component(str(comp))
    jax.tree.map(np.testing.assert_array_equal, back, params)
    _, half = load_component(str(comp), param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16)),
                 half, params)
    # A config that no longer fits the saved params: the mismatch names the paths, before any data is read.
    cfg = json.loads((comp / "config.json").read_text())
    cfg["intermediate_size"] = 20
    (comp / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="the saved params do not match the model") as e:
        load_component(str(comp))
    assert "text_model/encoder/layers_0/mlp/fc1/kernel (16, 24), expected (16, 20)" in e.value.misshaped
