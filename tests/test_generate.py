"""`unclip-jax generate` and unclip_jax.generation: input parsing and planning, per-item determinism
(batch sizes 1 / 3 / 4, 1 vs 8 forced CPU devices), resume after SIGKILL (bit-equal files), webdataset
shards, the CLIP score against transformers' CLIPModel, bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import jax
import numpy as np
import PIL.Image
import pytest

from unclip_jax import files
from unclip_jax.generation import items as gi
from unclip_jax.generation import output

TOL = 1e-5  # max abs difference of images in [0, 1] (output scale 1), as tests/test_sharding.py
REPO = Path(__file__).resolve().parent.parent
TXT2IMG = dict(num_inference_steps=2, guidance_scale=3.0, negative_prompt=None, eta=0.5, noise_level=20,
               prior_num_inference_steps=2, prior_guidance_scale=4.0, height=None, width=None, strength=0.8)


def _items(lines: list[str], pipeline="txt2img", defaults=TXT2IMG, seed=0, tmp_path=None):
    path = (tmp_path or Path(os.environ.get("TMPDIR", "/tmp"))) / f"prompts-{os.getpid()}-{random.random()}.txt"
    path.write_text("\n".join(lines) + "\n")
    return gi.read_prompts(str(path), pipeline=pipeline, defaults=defaults, seed=seed)


# ------------------------------------------------------------------------------------------ parsing, planning


def test_read_prompts_plain_json_and_bad_lines(tmp_path):
    lines = ["a red fox", "", '{"prompt": "a lighthouse", "seed": 7, "guidance_scale": 1.0}', '{"prompt": "x",',
             '{"prompt": "y", "stepz": 3}', '{"seed": 2}', '{"prompt": "z", "num_inference_steps": 0}', "last"]
    items, errors = _items(lines, tmp_path=tmp_path)
    assert [it.index for it in items] == [0, 1, 6]  # bad lines keep their index; blank lines are not items
    assert [it.seed for it in items] == [0, 7, 6]
    assert items[1].args["guidance_scale"] == 1.0 and items[0].args["guidance_scale"] == 3.0
    assert [e.split(": ")[0].rsplit(":", 1)[1] for e in errors] == ["4", "5", "6", "7"]  # line numbers
    assert "not valid JSON" in errors[0] and "'stepz'" in errors[1] and "no prompt" in errors[2]
    assert "num_inference_steps" in errors[3]


def test_read_prompts_images_relative_to_the_file(tmp_path):
    lines = ["pics/a.png", '{"image": "/abs/b.png", "prompt": "snow"}', '{"prompt": "no image"}']
    items, errors = _items(lines, pipeline="variation", tmp_path=tmp_path)
    assert [it.image for it in items] == [str(tmp_path / "pics" / "a.png"), "/abs/b.png"]
    assert items[1].args["prompt"] == "snow" and items[0].args["prompt"] == ""
    assert len(errors) == 1 and ":3:" in errors[0] and "needs an `image`" in errors[0]


def test_plan_groups_static_arguments_and_is_independent_of_hosts():
    lines = ["p0", '{"prompt": "p1", "num_inference_steps": 3}', "p2", "p3", '{"prompt": "p4", "guidance_scale": 1}',
             "p5", '{"prompt": "p6", "num_inference_steps": 3}', "p7"]
    items, errors = _items(lines)
    assert not errors
    batches = gi.plan_batches(items, [gi.group_key(it, "txt2img") for it in items], 2)
    assert [[it.index for it in b.items] for b in batches] == [[0, 2], [1, 6], [3, 5], [4], [7]]
    # The plan reads only the items: the same for any device or host count, or a resumed run.
    units = gi.plan_units(batches, 2)
    for count in (1, 2, 3, 4, 7):
        shares = [gi.host_share(units, i, count) for i in range(count)]
        flat = [b.number for share in shares for unit in share for b in unit]
        assert sorted(flat) == list(range(len(batches)))  # every batch once, on exactly one host
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="process_index"):
        gi.host_share(units, 2, 2)


def test_dataset_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"caption": ["a cat", "", "a dog"], "n": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    items, errors = gi.read_dataset(str(tmp_path / "ds"), column="caption", image_column=None, split="train",
                                    pipeline="txt2img", defaults=TXT2IMG, seed=5)
    assert [(it.index, it.seed, it.args["prompt"]) for it in items] == [(0, 5, "a cat"), (2, 7, "a dog")]
    assert len(errors) == 1 and "[1]" in errors[0] and "no prompt" in errors[0]
    with pytest.raises(gi.InputError, match="no column 'text'"):
        gi.read_dataset(str(tmp_path / "ds"), column="text", image_column=None, split="train", pipeline="txt2img",
                        defaults=TXT2IMG, seed=0)


# ------------------------------------------------------------------------------------------ determinism


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from unclip_jax.tiny import write_tiny

    root = tmp_path_factory.mktemp("generate_models")
    return {kind: write_tiny(kind, str(root / kind)) for kind in ("unclip", "depth2img")}


@pytest.fixture(scope="module")
def runners(tiny_dirs):
    """txt2img runners on 1 device and on 8 (one pipeline object: compiled programs are shared)."""
    import unclip_jax
    from unclip_jax.generation.run import BatchRunner
    from unclip_jax.sharding import make_mesh

    assert len(jax.devices()) >= 8, "needs 8 devices (tests/conftest.py forces them)"
    pipe, params = unclip_jax.StableUnCLIPPipeline.from_pretrained(tiny_dirs["unclip"])
    return {n: BatchRunner(pipe, params, "txt2img", mesh=make_mesh(devices=jax.devices()[:n])) for n in (1, 8)}


def test_draws_are_per_item():
    from unclip_jax.generation.run import DRAW_IDS, item_draws, item_keys

    shapes = (("latents", (4, 4, 2), 0), ("step_noise", (3, 4, 4, 2), 1))
    alone = item_draws([11], shapes)
    batch = item_draws([5, 11, 2**40], shapes)
    assert batch["latents"].shape == (3, 4, 4, 2) and batch["step_noise"].shape == (3, 3, 4, 4, 2)
    np.testing.assert_array_equal(batch["latents"][1], alone["latents"][0])  # bit-equal
    np.testing.assert_array_equal(batch["step_noise"][:, 1], alone["step_noise"][:, 0])
    assert not np.allclose(batch["latents"][0], batch["latents"][1])
    # Each draw is jax.random.key(seed) folded with the input's constant, as documented ...
    direct = jax.random.normal(jax.random.fold_in(jax.random.key(11), DRAW_IDS["latents"]), (4, 4, 2))
    np.testing.assert_array_equal(alone["latents"][0], np.asarray(direct))
    # ... and seeds past 32 bits keep their high word (jax.random.key without x64 would drop it).
    high = np.asarray(jax.random.key_data(item_keys([2**40 + 5, 5])))
    assert high.tolist() == [[256, 5], [0, 5]]


def test_images_do_not_depend_on_batch_or_devices(runners):
    """Two compiled programs: 4 rows on one device, and 8 rows (padded) split over 8 devices, one row each.
    Batches of 1, 3 and 4 items run through them; every item's image must agree."""
    items, _ = _items(["a red fox", "a blue car", "a lighthouse", "a red fox"])
    items = [runners[1].resolve(it) for it in items]
    four = runners[1].run(items, pad_to=4)
    three = np.concatenate([runners[1].run(items[:3], pad_to=4), runners[1].run(items[3:], pad_to=4)])
    one_on_8 = np.concatenate([runners[8].run([it], pad_to=1) for it in items])
    four_on_8 = runners[8].run(items, pad_to=4)
    assert four.shape == (4, 32, 32, 3)
    for other in (three, one_on_8, four_on_8):
        assert np.abs(other - four).max() <= TOL
    # Not vacuous: items 0 and 3 share a prompt but not a seed; an item's index does not matter, its seed does.
    assert np.abs(four[0] - four[3]).max() > 1e-2
    moved = runners[8].run([gi.Item(9, 0, items[3].args)], pad_to=1)
    assert np.abs(moved[0] - four[0]).max() <= TOL


def test_depth2img_does_not_depend_on_batch_or_devices(tiny_dirs, tmp_path):
    import unclip_jax
    from unclip_jax.generation.run import BatchRunner, load_image
    from unclip_jax.sharding import make_mesh

    pipe, params = unclip_jax.StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_dirs["depth2img"])
    rng = np.random.RandomState(0)
    for i in range(2):
        PIL.Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    lines = [json.dumps({"prompt": f"statue {i}", "image": f"{i}.png"}) for i in range(2)]
    defaults = dict(TXT2IMG, strength=1.0)
    items, errors = _items(lines, pipeline="depth2img", defaults=defaults, tmp_path=tmp_path)
    assert not errors
    runner = BatchRunner(pipe, params, "depth2img", mesh=make_mesh(devices=jax.devices()[:1]))
    items = [runner.resolve(it) for it in items]
    images = [load_image(it) for it in items]
    # One program (2 rows; a lone item is padded with copies of itself): an item's image does not depend on
    # the item beside it. (Batch sizes and device counts are covered by the txt2img test above.)
    one = np.concatenate([runner.run([it], [im], pad_to=2) for it, im in zip(items, images)])
    both = runner.run(items, images, pad_to=2)
    assert np.abs(both - one).max() <= TOL
    assert np.abs(one[0] - one[1]).max() > 1e-2


# ------------------------------------------------------------------------------------------ files and resume


def _env(cache: Path) -> dict:
    """One CPU device and a compilation cache shared by the runs: each later process compiles nothing."""
    return dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_PLATFORMS="cpu", UNCLIP_JAX_CACHE_DIR=str(cache))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_after_sigkill_gives_the_same_files(tiny_dirs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([f"prompt number {i}" for i in range(5)] + ['{"prompt": "own seed", "seed": 3}']))
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "unclip_jax.cli", "generate", str(prompts), "--model", tiny_dirs["unclip"],
           "--seed", "1", "--batch-size", "2", "--steps", "2", "--prior-steps", "2", "--guidance", "3", "--eta", "0.5"]
    ref = subprocess.run(cmd + ["--out", str(tmp_path / "ref")], env=_env(cache), capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr
    assert "made 6 image(s), skipped 0" in ref.stderr
    expected = _files(tmp_path / "ref")
    assert sorted(expected) == ["00000.png", "00001.png", "00002.png", "00003.png", "00004.png", "00005.png",
                                "index.jsonl", "run.json"]

    out = tmp_path / "resumed"
    rng = random.Random(20)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd + ["--out", str(out)], env=_env(cache), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # Kill at a random moment after a random number of finished items (0: while starting or in batch 1).
        target = rng.randrange(0, 6)
        index = out / "index.jsonl"
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if target == 0 or (index.exists() and index.read_bytes().count(b"\n") >= target):
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    final = subprocess.run(cmd + ["--out", str(out)], env=_env(cache), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    got = _files(out)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name
    records = [json.loads(line) for line in got["index.jsonl"].splitlines()]
    assert [r["index"] for r in records] == list(range(6)) and [r["seed"] for r in records] == [1, 2, 3, 4, 5, 3]
    meta = json.loads(PIL.Image.open(out / "00005.png").text["parameters"])
    assert meta["prompt"] == "own seed" and meta["seed"] == 3 and meta["file"] == "00005.png"


def test_torn_index_line_is_dropped(tmp_path):
    (tmp_path / "00000.png").write_bytes(b"x")
    good = json.dumps({"index": 0, "file": "00000.png"}) + "\n"
    missing = json.dumps({"index": 1, "file": "00001.png"}) + "\n"
    (tmp_path / "index.jsonl").write_text(good + missing + '{"index": 2, "fi')
    (tmp_path / ".00003.png.123.tmp").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("the user's")
    output.remove_temporaries(str(tmp_path))
    index = output.Index(str(tmp_path))
    assert index.load() == 2  # 00001.png is missing, line 3 is torn
    assert list(index.records) == [0]
    kept = json.dumps({"file": "00000.png", "index": 0}, sort_keys=True) + "\n"
    assert (tmp_path / "index.jsonl").read_text() == kept
    assert sorted(os.listdir(tmp_path)) == ["00000.png", "index.jsonl", "notes.txt"]


def test_webdataset_shards_resume(runners, tmp_path, monkeypatch):
    from unclip_jax.generation.run import generate

    items, _ = _items([f"prompt {i}" for i in range(5)])
    kw = dict(batch_size=2, fmt="webdataset", shard_size=4, progress=False, log=lambda m: None)
    summary = generate(runners[8], items, out=str(tmp_path / "ref"), **kw)
    assert (summary.made, summary.skipped, summary.total) == (5, 0, 5)
    expected = _files(tmp_path / "ref")
    assert sorted(expected) == ["index.jsonl", "run.json", "shard-00000.tar", "shard-00001.tar"]
    with tarfile.open(tmp_path / "ref" / "shard-00000.tar") as tar:
        assert tar.getnames() == ["00000.png", "00000.json", "00001.png", "00001.json", "00002.png", "00002.json",
                                  "00003.png", "00003.json"]

    # A run that dies while writing its first shard (after staging its first batch) ...
    real = files.atomic_write

    def dying(path, data):
        if os.path.basename(path).startswith("shard-"):
            raise KeyboardInterrupt("killed")
        real(path, data)

    monkeypatch.setattr(files, "atomic_write", dying)
    with pytest.raises(KeyboardInterrupt):
        generate(runners[8], items, out=str(tmp_path / "resumed"), **kw)
    assert sorted(os.listdir(tmp_path / "resumed" / output.PARTIAL)) == ["batch-000000.tar", "batch-000001.tar"]
    monkeypatch.setattr(files, "atomic_write", real)
    # ... resumes from its staged batches and ends with the same bytes.
    summary = generate(runners[8], items, out=str(tmp_path / "resumed"), **kw)
    assert (summary.made, summary.total) == (1, 5)
    assert _files(tmp_path / "resumed") == expected


def test_refuses_to_resume_another_run(runners, tmp_path):
    from unclip_jax.generation.run import generate

    items, _ = _items(["a"])
    generate(runners[8], items, out=str(tmp_path), batch_size=1, progress=False, fingerprint={"seed": 0})
    with pytest.raises(ValueError, match="differing: seed"):
        generate(runners[8], items, out=str(tmp_path), batch_size=1, progress=False, fingerprint={"seed": 1})


# ------------------------------------------------------------------------------------------ CLIP score


def _clip_folder(folder: Path, shape: str) -> Path:
    import torch
    import transformers

    from unclip_jax.tokenizer import write_clip_tokenizer

    text = {"a": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      hidden_act="quick_gelu"),
            "b": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                      hidden_act="gelu")}[shape]
    vision = {"a": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                        patch_size=8, hidden_act="quick_gelu"),
              "b": dict(hidden_size=40, intermediate_size=80, num_hidden_layers=1, num_attention_heads=2, image_size=24,
                        patch_size=6, hidden_act="gelu")}[shape]
    torch.manual_seed(0 if shape == "a" else 1)
    config = transformers.CLIPConfig(text_config=dict(text, vocab_size=49408, max_position_embeddings=77),
                                     vision_config=vision, projection_dim=16 if shape == "a" else 24)
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    write_clip_tokenizer(str(folder))
    size = vision["image_size"]
    transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}
                                    ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("shape", ["a", "b"])
@pytest.mark.filterwarnings("ignore:The following part of your input was truncated")  # the long caption, on purpose
def test_clip_score_matches_transformers(tmp_path, shape):
    import torch
    import transformers

    from unclip_jax.generation.clip_score import CLIPScorer, cosine

    folder = _clip_folder(tmp_path / "clip", shape)
    rng = np.random.RandomState(3)
    images = [PIL.Image.fromarray(rng.randint(0, 256, (40 + 8 * i, 36, 3), dtype=np.uint8)) for i in range(4)]
    texts = ["a photo of a cat", "a dog", "", "a very long caption " * 30]

    model = transformers.CLIPModel.from_pretrained(folder).eval()
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    proc = transformers.CLIPImageProcessor.from_pretrained(folder)
    with torch.no_grad():  # torchmetrics' CLIPScore: normalise, 100 * cos, clamp at 0
        t = model.get_text_features(**tok(texts, padding=True, truncation=True, return_tensors="pt"))
        i = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
        t, i = (getattr(x, "pooler_output", x) for x in (t, i))
        t, i = t / t.norm(dim=-1, keepdim=True), i / i.norm(dim=-1, keepdim=True)
        cos_ref = (t * i).sum(-1).numpy()
        other = torch.roll(i, 1, 0)
        cos_img_ref = (i * other).sum(-1).numpy()

    scorer = CLIPScorer.from_pretrained(str(folder))
    cos = cosine(scorer.image_embeds(images), scorer.text_embeds(texts))
    np.testing.assert_allclose(cos, cos_ref, atol=1e-5)
    np.testing.assert_allclose(scorer.score_text(images, texts), 100 * np.maximum(cos_ref, 0), atol=1e-3)
    np.testing.assert_allclose(scorer.score_images(images, images[-1:] + images[:-1]),
                               100 * np.maximum(cos_img_ref, 0), atol=1e-3)
    assert (cos_ref < 0).any() or (cos_ref > 0).all()  # the clamp is exercised where random weights allow


# ------------------------------------------------------------------------------------------ command line


def test_cli_strict_and_bad_input(tiny_dirs, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text('a cat\n{"prompt": 3}\n')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "unclip_jax.cli", "generate", str(prompts), "--model", tiny_dirs["unclip"],
            "--out", str(tmp_path / "out")]
    r = subprocess.run(base + ["--strict"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == f"unclip-jax generate: error: {prompts}:2: `prompt` must be a string; got int"
    assert not (tmp_path / "out").exists()  # stopped before any work
    r = subprocess.run(base + ["--batch-size", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--batch-size must be at least 1" in r.stderr


def test_unreadable_image_is_named_and_skipped(tmp_path):
    from unclip_jax.generation.run import image_size

    (tmp_path / "broken.png").write_bytes(b"not a png")
    items, errors = _items(['{"image": "broken.png"}', '{"image": "missing.png"}'], pipeline="variation",
                           tmp_path=tmp_path)
    assert not errors
    with pytest.raises(gi.InputError, match="broken.png: cannot read it as an image"):
        image_size(items[0])
    with pytest.raises(gi.InputError, match="missing.png: no such image file"):
        image_size(items[1])


def test_defaults_follow_the_default_model_or_the_pipeline():
    """Without --model, generate samples with the shipped model's guidance (as txt2img & co); with one,
    with diffusers' pipeline defaults; flags win over both."""
    from unclip_jax.cli import parser
    from unclip_jax.generation.command import defaults_of
    from unclip_jax.toy.default import SAMPLING

    def parsed(*extra):
        return defaults_of(parser().parse_args(["generate", "p.txt", "--out", "o", *extra]))

    own = parsed()
    assert (own["guidance_scale"], own["prior_guidance_scale"]) == (SAMPLING["txt2img"]["guidance"],
                                                                    SAMPLING["txt2img"]["prior_guidance"])
    assert parsed("--pipeline", "variation")["guidance_scale"] == SAMPLING["variation"]["guidance"]
    assert parsed("--pipeline", "depth2img")["guidance_scale"] == SAMPLING["depth2img"]["guidance"]
    other = parsed("--model", "m")
    assert (other["guidance_scale"], other["prior_guidance_scale"]) == (10.0, 4.0)
    flags = parsed("--guidance", "3", "--prior-guidance", "1.5")
    assert (flags["guidance_scale"], flags["prior_guidance_scale"]) == (3.0, 1.5)
