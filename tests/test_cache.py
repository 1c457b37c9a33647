"""The abstract param trees' cache (weights/convert.py `abstract_params`): one per process, shared by
loading and the pipelines' params check, and on disk beside the compilation cache (unclip_jax/cache.py)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models import clip, prior
from unclip_jax.pipelines.base import DiffusionPipeline
from unclip_jax.weights import convert
from unclip_jax.weights.errors import ConversionError


def _text(hidden=8, dtype=jnp.float32):
    c = clip.CLIPTextConfig(hidden_size=hidden, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=8, vocab_size=100)
    return clip.CLIPTextModel(c, dtype=dtype), clip.dummy_text_inputs(c)


def _traced(model, inputs):
    """The tree straight from tracing init: what every cached tree must equal."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty in-process cache, the disk cache in tmp_path/abstract, and a count of init tracings."""
    monkeypatch.setattr(convert, "_MEMO", {})
    monkeypatch.setattr(convert, "_ABSTRACT_DIR", str(tmp_path / "abstract"))
    traced = []
    real = jax.eval_shape

    def counting(fn, *args, **kwargs):
        traced.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(convert.jax, "eval_shape", counting)
    return tmp_path / "abstract", traced


def _entries(folder):
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_hit_in_process_and_on_disk(fresh):
    folder, traced = fresh
    model, inputs = _text()
    want = _traced(model, inputs)
    traced.clear()
    first = convert.abstract_params(model, *inputs)
    assert first == want and len(traced) == 1 and len(_entries(folder)) == 1
    first["embeddings"] = None  # callers get their own dicts
    assert convert.abstract_params(model, *inputs) == want and len(traced) == 1
    # A new process: nothing in memory, the tree read from disk, equal to the traced one (dtypes too).
    convert._MEMO.clear()
    model2, inputs2 = _text()
    again = convert.abstract_params(model2, *inputs2)
    assert again == want and len(traced) == 1
    assert not [n for n in os.listdir(folder) if n.startswith(".tmp")]


def test_key_follows_config_dtype_and_input_shapes(fresh):
    folder, traced = fresh
    model, inputs = _text()
    convert.abstract_params(model, *inputs)
    for model, inputs in (_text(hidden=16), _text(dtype=jnp.bfloat16)):
        assert convert.abstract_params(model, *inputs) == _traced(model, inputs)
    model, _ = _text()
    assert convert.abstract_params(model, jnp.zeros((1, 4), jnp.int32)) == _traced(model, (jnp.zeros((1, 4), jnp.int32),))
    assert len(_entries(folder)) == 4
    # A Python value among the arguments is part of the key, not only its type.
    one = convert._memo_key(model, (jnp.zeros((1, 8), jnp.int32),), {"clip_skip": 1})
    assert one != convert._memo_key(model, (jnp.zeros((1, 8), jnp.int32),), {"clip_skip": 0})


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong form", "empty"])
def test_corrupt_entry_is_ignored_and_replaced(fresh, damage):
    folder, traced = fresh
    model, inputs = _text()
    convert.abstract_params(model, *inputs)
    (name,) = _entries(folder)
    path = folder / name
    text = path.read_text()
    path.write_text({"garbage": "\x00not json", "truncated": text[: len(text) // 2],
                     "wrong form": json.dumps({"params": [[["a"], "x", "float32"]]}), "empty": ""}[damage])
    convert._MEMO.clear()
    traced.clear()
    assert convert.abstract_params(model, *inputs) == _traced(model, inputs)
    assert len(traced) == 2  # traced again (and once more above, for the reference)
    assert json.loads(path.read_text()) == json.loads(text)


def test_stale_entry_is_not_read(fresh, monkeypatch):
    """An entry written by other model code or another jax is under another name, so never read."""
    folder, traced = fresh
    model, inputs = _text()
    convert.abstract_params(model, *inputs)
    (name,) = _entries(folder)
    # A stored tree that no longer matches the model: if it were read, the result would be wrong.
    (folder / name).write_text(json.dumps({"params": [[["x", "kernel"], [1], "float32"]]}))
    for patch in (lambda: monkeypatch.setattr(convert, "_SOURCE_DIGESTS", {k: "changed" for k in convert._SOURCE_DIGESTS}),
                  lambda: monkeypatch.setattr(jax, "__version__", "0.0.0")):
        patch()
        convert._MEMO.clear()
        assert convert.abstract_params(model, *inputs) == _traced(model, inputs)
    assert len(_entries(folder)) == 3


def test_source_digest_changes_with_the_code(tmp_path, monkeypatch):
    class Fake:
        pass

    (tmp_path / "m.py").write_text("A = 1\n")
    monkeypatch.setitem(__import__("sys").modules, "fake_models_mod", type("M", (), {"__file__": str(tmp_path / "m.py")}))
    Fake.__module__ = "fake_models_mod"
    monkeypatch.setattr(convert, "_SOURCE_DIGESTS", {})
    before = convert._source_digest(Fake)
    (tmp_path / "m.py").write_text("A = 2\n")
    convert._SOURCE_DIGESTS.clear()
    assert convert._source_digest(Fake) != before


def test_no_disk_cache_unless_enabled(fresh, monkeypatch):
    folder, traced = fresh
    monkeypatch.setattr(convert, "_ABSTRACT_DIR", None)
    model, inputs = _text()
    assert convert.abstract_params(model, *inputs) == _traced(model, inputs)
    assert not folder.exists()


class _NormalizerOnly(DiffusionPipeline):
    COMPONENTS = ("image_normalizer",)


def test_pipeline_params_check_reuses_the_loaded_tree(fresh):
    """The pipelines' params check asks the same cache that loading filled: no second tracing."""
    _, traced = fresh
    c = prior.ImageNormalizerConfig(embedding_dim=6)
    module = prior.StableUnCLIPImageNormalizer(c)
    abstract = convert.abstract_params(module, *prior.dummy_normalizer_inputs(c))  # as loading does
    traced.clear()
    pipe = _NormalizerOnly(image_normalizer=module)
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
    pipe.check_params({"image_normalizer": params}, ["image_normalizer"])
    bad = jax.tree.map(lambda x: np.zeros((*x.shape, 2), x.dtype), abstract)
    with pytest.raises(ConversionError, match="image_normalizer"):
        pipe.check_params({"image_normalizer": bad}, ["image_normalizer"])
    assert traced == []


def test_enable_compilation_cache_keeps_trees_in_its_folder(tmp_path, monkeypatch):
    from unclip_jax import cache

    monkeypatch.setattr(convert, "_ABSTRACT_DIR", None)
    monkeypatch.setattr(cache.jax.config, "update", lambda *a: None)  # this process's JAX stays as it is
    assert cache.enable_compilation_cache(tmp_path / "c") == str(tmp_path / "c")
    assert convert._ABSTRACT_DIR == str(tmp_path / "c" / "abstract")
