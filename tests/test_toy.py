"""The toy domain (unclip_jax.toy.domain), its measures (toy.measure) and the initial pipeline folders
(toy.init). The measures are checked against what the generator says it drew, on clean and perturbed
pictures, held-out combinations included."""

import json
import math
import os

import numpy as np
import pytest

from unclip_jax.toy import domain, measure

N = 200  # pictures per measure check (~2 ms each to draw and measure)


def _blur(x: np.ndarray) -> np.ndarray:
    """A [1, 2, 1] / 4 blur along both axes (edges repeated)."""
    x = x.astype(np.float64)
    k = (0.25, 0.5, 0.25)
    p = np.pad(x, ((1, 1), (0, 0), (0, 0)), mode="edge")
    x = sum(w * p[i:i + x.shape[0]] for i, w in enumerate(k))
    p = np.pad(x, ((0, 0), (1, 1), (0, 0)), mode="edge")
    x = sum(w * p[:, i:i + x.shape[1]] for i, w in enumerate(k))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _noise(x: np.ndarray, rng: np.random.Generator, sigma: float = 12.0) -> np.ndarray:
    return np.clip(np.rint(x + rng.normal(0.0, sigma, x.shape)), 0, 255).astype(np.uint8)


def test_palette_and_combos():
    assert domain.PALETTE["red"] == (230, 25, 25) and domain.PALETTE["purple"] == (120, 50, 170)
    assert len(domain.PALETTE) == 10 and len(domain.ALL_COMBOS) == 3 * 10 * 9
    assert set(domain.HELD_OUT) <= set(domain.ALL_COMBOS)
    assert not set(domain.HELD_OUT) & set(domain.TRAIN_COMBOS)
    # Every shape, colour and background still appears in training.
    for i in range(3):
        assert {c[i] for c in domain.TRAIN_COMBOS} == {c[i] for c in domain.ALL_COMBOS}


def test_draw_is_deterministic_and_respects_held_out():
    a, b = domain.draw(3, 17), domain.draw(3, 17)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    assert not np.array_equal(a[0], domain.draw(3, 18)[0])
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8
    held = set(domain.HELD_OUT)
    for i in range(200):
        _, text, attrs = domain.draw(0, i)
        combo = (attrs["shape"], attrs["color"], attrs["background"])
        assert combo not in held and attrs["color"] != attrs["background"]
        assert attrs["color"] in text and attrs["shape"] in text and f"{attrs['background']} background" in text
        assert " a orange" not in f" {text}" and " an red" not in f" {text}"
        _, _, attrs = domain.draw(0, i, held_out=True)
        assert (attrs["shape"], attrs["color"], attrs["background"]) in held
    with pytest.raises(ValueError, match="seed"):
        domain.draw(-1, 0)


def test_captions_vary():
    texts = {domain.draw(1, i)[1] for i in range(300)}
    words = " ".join(texts)
    for phrase in ("an orange", "small", "large", "top left", "against", "in the middle"):
        assert phrase in words, phrase
    assert domain.canonical_caption("circle", "red", "blue") == "a red circle on a blue background"
    assert domain.canonical_caption("square", "orange", "white") == "an orange square on a white background"


def test_shape_geometry():
    # The continuous shapes fill their bounding boxes as the measure assumes (fine supersampled coverage).
    for shape, fill in domain.SHAPES.items():
        cover = domain._coverage(domain.shape_inside(shape, 32.0, 32.0, 16.0))
        assert abs(cover.sum() / 32.0 ** 2 - fill) < 0.01, shape
    assert abs(domain.SHAPES["circle"] - math.pi / 4) < 1e-12


@pytest.mark.parametrize("held_out", [False, True])
@pytest.mark.parametrize("perturb", ["clean", "noise", "blur", "noise+blur"])
def test_measure_on_drawn_pictures(held_out, perturb):
    rng = np.random.default_rng(7)
    wrong = {"shape": 0, "color": 0, "background": 0}
    for i in range(N):
        image, _, attrs = domain.draw(11, i, held_out=held_out)
        if "noise" in perturb:
            image = _noise(image, rng)
        if "blur" in perturb:
            image = _blur(image)
        got = measure.measure(image)
        for k in wrong:
            wrong[k] += got[k] != attrs[k]
    # Colours are far apart: no error is allowed; the fill measure may miss on a few small blurred
    # triangles (their apex pixel fades), so perturbed pictures get 3% slack.
    assert wrong["color"] == 0 and wrong["background"] == 0, wrong
    assert wrong["shape"] <= (0.01 if perturb == "clean" else 0.03) * N, wrong


def test_measure_accepts_float_pictures_and_blank_ones():
    image, _, attrs = domain.draw(2, 0)
    got = measure.measure(image.astype(np.float32) / 255.0)
    assert (got["shape"], got["color"], got["background"]) == (attrs["shape"], attrs["color"], attrs["background"])
    blank = np.full((64, 64, 3), domain.PALETTE["green"], np.uint8)
    assert measure.measure(blank) == dict(background="green", area=0, shape=None, color=None, fill=0.0)
    with pytest.raises(ValueError, match="image must be"):
        measure.measure(np.zeros((64, 64)))


def test_depth_scenes():
    for i in range(40):
        image, disparity, text, attrs = domain.draw_depth(4, i)
        assert image.shape == (64, 64, 3) and disparity.shape == (64, 64) and disparity.dtype == np.float32
        assert 0 < disparity.min() and disparity.max() <= 1.0
        assert (attrs["shape"], attrs["color"], attrs["background"]) not in set(domain.HELD_OUT)
        assert attrs["color"] in text and f"{attrs['background']} background" in text
        # Nearer is lower in the picture: the bottom row is the ground's nearest, at disparity ~1.
        col = disparity[:, 0]
        assert col[-1] >= col[0]
        # The shape's pixels are those at the shapes' disparities, and they carry the shape colour.
        on_shape = np.isin(disparity, np.float32([o["disparity"] for o in attrs["objects"]]))
        assert on_shape.any()
        assert measure.nearest_color(np.median(image[on_shape], axis=0)) == attrs["color"]
    # The measure's border colour is the background's, despite the ground's shading.
    assert measure.nearest_color(measure.border_rgb(image)) == attrs["background"]


def test_depth_correlation():
    _, d, _, _ = domain.draw_depth(0, 1)
    assert measure.depth_correlation(d, d) == pytest.approx(1.0)
    assert measure.depth_correlation(d, 2 * d + 3) == pytest.approx(1.0)
    assert measure.depth_correlation(d, -d) == pytest.approx(-1.0)
    noisy = d + np.random.default_rng(0).normal(0, 0.02, d.shape)
    assert 0.9 < measure.depth_correlation(d, noisy) < 1.0
    with pytest.raises(ValueError, match="differ in size"):
        measure.depth_correlation(d, d[:32])
    with pytest.raises(ValueError, match="constant"):
        measure.depth_correlation(d, np.ones_like(d))


@pytest.mark.parametrize("depth_format", ["npy", "png16"])
def test_write_dataset(tmp_path, depth_format):
    out = domain.write_dataset(str(tmp_path / "depth"), 4, seed=5, depth=True, depth_format=depth_format)
    rows = [json.loads(line) for line in open(os.path.join(out, "metadata.jsonl"))]
    attrs = [json.loads(line) for line in open(os.path.join(out, "attributes.jsonl"))]
    assert len(rows) == len(attrs) == 4
    from PIL import Image

    for i, row in enumerate(rows):
        image, disparity, text, _ = domain.draw_depth(5, i)
        assert row["text"] == text
        assert np.array_equal(np.asarray(Image.open(os.path.join(out, row["file_name"]))), image)
        got = domain.read_depth(os.path.join(out, row["depth_file_name"]))
        np.testing.assert_allclose(got, disparity, atol=0 if depth_format == "npy" else 1 / 65535)
    flat = domain.write_dataset(str(tmp_path / "flat"), 3, seed=5)
    rows = [json.loads(line) for line in open(os.path.join(flat, "metadata.jsonl"))]
    assert [r["text"] for r in rows] == [domain.draw(5, i)[1] for i in range(3)]
    assert "depth_file_name" not in rows[0]
    with pytest.raises(FileExistsError):
        domain.write_dataset(flat, 3, seed=5)
    assert domain.write_dataset(flat, 3, seed=5, exist_ok=True) == flat  # the same dataset: kept
    with pytest.raises(FileExistsError, match="not this dataset"):
        domain.write_dataset(flat, 4, seed=5, exist_ok=True)
    # Nothing but the two folders: no partial siblings are left.
    assert sorted(os.listdir(tmp_path)) == ["depth", "flat"]


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    from unclip_jax.toy import init

    return init.write_initial(str(tmp_path_factory.mktemp("toy") / "initial"), seed=0)


def test_initial_folders_load(initial):
    import jax

    import unclip_jax as uj
    from unclip_jax.toy import init

    images = np.stack([domain.draw(0, i)[0] for i in range(6)])
    mean, std = init.set_embedding_stats(os.path.join(initial, "unclip"), images, batch=4)
    pipe, params = uj.StableUnCLIPPipeline.from_pretrained(os.path.join(initial, "unclip"))
    pipe_img, params_img = uj.StableUnCLIPImg2ImgPipeline.from_pretrained(os.path.join(initial, "unclip"))
    # The embedding statistics, recomputed here from the loaded image encoder, are where the pipelines read them.
    embeds = np.asarray(pipe_img.encode_image(params_img, images), np.float64)
    np.testing.assert_allclose(mean, embeds.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, embeds.std(0), rtol=1e-4, atol=1e-6)
    for p in (params, params_img):
        np.testing.assert_array_equal(p["image_normalizer"]["mean"][0], mean)
        np.testing.assert_array_equal(p["image_normalizer"]["std"][0], std)
    np.testing.assert_array_equal(params["prior"]["clip_mean"][0], mean)
    np.testing.assert_array_equal(params["prior"]["clip_std"][0], std)
    pipe_depth, params_depth = uj.StableDiffusionDepth2ImgPipeline.from_pretrained(os.path.join(initial, "depth2img"))
    assert pipe.tokenizer("a red circle").input_ids[1] != pipe.tokenizer.unk_token_id
    count = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p)) for name, p in params.items()}
    count["image_encoder"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_img["image_encoder"]))
    depth = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p)) for name, p in params_depth.items()}
    # The counts the module docstring states, and the shipped size the issue allows.
    assert count["unet"] == 1_421_732 and depth["unet"] == 1_466_788 and count["prior"] == 222_112
    assert 2 * (sum(count.values()) + sum(depth.values())) < 25e6
    # One text tower: the prior's is the decoder's with an identity projection, the depth model's the same.
    for text in (params["prior_text_encoder"], params_depth["text_encoder"]):
        assert jax.tree.structure(text["text_model"]) == jax.tree.structure(params["text_encoder"]["text_model"])
        for a, b in zip(jax.tree.leaves(text["text_model"]), jax.tree.leaves(params["text_encoder"]["text_model"])):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(params["prior_text_encoder"]["text_projection"]["kernel"], np.eye(32))
    ids = pipe.tokenizer(["a red circle on a blue background"], padding="max_length", max_length=77,
                         return_tensors="np").input_ids
    pooled = pipe.text_encoder.apply({"params": params["text_encoder"]}, ids).pooler_output
    projected = pipe.prior_text_encoder.apply({"params": params["prior_text_encoder"]}, ids)
    np.testing.assert_allclose(np.asarray(projected.embeds), np.asarray(pooled), rtol=1e-5, atol=1e-6)
    assert init.CONFIGS["unclip"][1]["vae"] is init.CONFIGS["depth2img"][1]["vae"]

    # The vae and dpt objectives build on these pipelines (their losses are tested below; compiling them
    # on these models costs ~40 s of CPU, so only the host half is exercised here).
    from unclip_jax.training.objectives import dpt, vae

    vae_objective, _, _ = vae.build(pipe_img, params_img, {})
    batch = vae_objective.collate([{"image": images[0], "text": "x"}, {"image": images[1], "text": "y"}])
    assert batch["pixel_values"].shape == (2, 64, 64, 3) and batch["pixel_values"].min() >= -1
    trainable, frozen = vae_objective.split(params_img)
    assert set(trainable) == {"vae"} and set(vae_objective.merge(trainable, frozen)) == set(params_img)
    dpt_objective, _, _ = dpt.build(pipe_depth, params_depth, {})
    scenes = [domain.draw_depth(0, i) for i in range(2)]
    batch = dpt_objective.collate([{"image": im, "text": t, "depth": d} for im, d, t, _ in scenes])
    assert batch["pixel_values"].shape == (2, 64, 64, 3) and batch["depth"].shape == (2, 64, 64)
    with pytest.raises(ValueError, match="no depth map"):
        dpt_objective.collate([{"image": scenes[0][0], "text": "x"}])


def test_gaussian_kl_and_scale_shift_invariant_loss():
    from unclip_jax.training.objectives import dpt, vae

    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(3, 4, 4, 2)), rng.normal(size=(3, 4, 4, 2))
    want = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar).reshape(3, -1).sum(1)
    np.testing.assert_allclose(vae.gaussian_kl(mean, logvar), want, rtol=1e-5)
    assert float(vae.gaussian_kl(np.zeros((1, 3)), np.zeros((1, 3)))[0]) == 0.0

    pred, target = rng.normal(size=(2, 8, 8)), rng.normal(size=(2, 8, 8))

    def normalized(x):  # per example: minus the mean, over the mean absolute deviation
        x = x.reshape(len(x), -1)
        x = x - x.mean(1, keepdims=True)
        return x / np.abs(x).mean(1, keepdims=True)

    np.testing.assert_allclose(dpt.scale_shift_invariant_loss(pred, target),
                               np.abs(normalized(pred) - normalized(target)).mean(), rtol=1e-5)
    # A positive scale and any shift of the target are free; a negative scale (depth upside down) is not.
    assert float(dpt.scale_shift_invariant_loss(pred, 3 * pred + 2)) < 1e-5
    assert float(dpt.scale_shift_invariant_loss(pred, -3 * pred + 2)) > 1.5


def test_vae_loss_trains():
    # A stand-in autoencoder with the VAE's encode/decode interface (1 x 1 convolutions: compiling the real
    # VAE's gradient costs ~30 s of CPU), so the loss is checked against numpy and trained a few steps.
    import flax.linen as nn
    import jax
    import optax

    from unclip_jax.models.vae import DiagonalGaussian
    from unclip_jax.training.objectives import vae as vae_objective

    class Tiny(nn.Module):
        def setup(self):
            self.enc = nn.Conv(4, (1, 1))
            self.dec = nn.Conv(3, (1, 1))

        def encode(self, x):
            return DiagonalGaussian.from_moments(self.enc(x))

        def decode(self, z):
            return self.dec(z)

        def __call__(self, x):
            return self.decode(self.encode(x).mean)

    model = Tiny()
    pixels = np.stack([domain.draw(0, i)[0][::4, ::4] for i in range(4)]).astype(np.float32) / 127.5 - 1
    params = model.init(jax.random.key(0), pixels)["params"]
    noise = np.asarray(jax.random.normal(jax.random.key(1), (4, 16, 16, 2)))

    moments = np.asarray(model.apply({"params": params}, pixels, method=lambda m, x: m.enc(x)), np.float64)
    mean, logvar = moments[..., :2], np.clip(moments[..., 2:], -30, 20)
    recon = np.asarray(model.apply({"params": params}, (mean + np.exp(0.5 * logvar) * noise).astype(np.float32),
                                 method=Tiny.decode))
    kl = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar).reshape(4, -1).sum(1).mean()
    want = np.abs(recon - pixels).mean() + 1e-3 * kl / pixels[0].size
    loss, metrics = vae_objective.vae_loss(model, params, pixels, noise, 1e-3)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5)

    opt = optax.adam(3e-2)

    @jax.jit
    def step(params, state):
        (loss, _), grads = jax.value_and_grad(vae_objective.vae_loss, argnums=1, has_aux=True)(
            model, params, pixels, noise, 1e-3)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = opt.init(params)
    losses = []
    for _ in range(10):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses


def _training_script():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        "train_default_model.py")
    spec = importlib.util.spec_from_file_location("train_default_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_script_commands(tmp_path, capsys):
    script = _training_script()
    assert script.main(["--work", str(tmp_path), "--dry-run"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    run = list(script.TRAINING)
    assert run == ["clip", "vae", "prior", "decoder", "variation", "dpt", "depth"]
    objectives = [script.OBJECTIVE.get(name, name) for name in run]
    # "$ python -m unclip_jax.cli train OBJECTIVE ... --out WORK/runs/STAGE": every training stage, in order
    assert [line.split()[5] for line in printed] == objectives
    assert [line.split()[line.split().index("--out") + 1] for line in printed] == \
        [str(tmp_path / "runs" / name) for name in run]
    assert os.listdir(tmp_path) == []  # a dry run writes nothing
    # Every stage's arguments parse with the CLI's own parser, for the objectives it offers.
    from unclip_jax import cli

    import argparse

    parser = cli.parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "train" not in commands:
        pytest.skip("no `unclip-jax train` command yet")
    offered = set(next(a for a in commands["train"]._actions if a.dest == "objective").choices)
    for name, objective in zip(run, objectives):
        if objective in offered:
            args = parser.parse_args(script.training_arguments(name, str(tmp_path), 0))
            assert args.objective == objective and args.steps == script.TRAINING[name][3]["steps"]
            assert not args.vae_decoder_only
            if name == "vae":  # the shaped latents the decoder relies on
                assert args.vae_mask_weight > 0 and args.vae_smooth_weight > 0
            if name == "variation":  # the decoder again, mostly without its text
                assert args.text_dropout == 0.5


def test_evaluation_prompts_and_score():
    prompts = measure.evaluation_prompts()
    assert len(prompts) == 270 and prompts[0][0] == domain.canonical_caption(*prompts[0][1])
    assert set(domain.HELD_OUT) <= {combo for _, combo in prompts}
    assert len(measure.evaluation_prompts(every=9)) == 30
    # Drawn pictures of every 9th combination score perfectly; wrong requests are counted as wrong.
    combos = [combo for _, combo in measure.evaluation_prompts(every=9)]
    rng = np.random.default_rng(0)
    images = [domain.render(s, c, b, (32.0, 32.0), 14.0, rng) for s, c, b in combos]
    assert measure.score(images, combos) == dict(colors=1.0, color=1.0, background=1.0, shape=1.0, all=1.0)
    swapped = [(s, b, c) for s, c, b in combos]
    got = measure.score(images, swapped)
    assert got["colors"] == 0.0 and got["shape"] == 1.0
    with pytest.raises(ValueError, match="one combination per picture"):
        measure.score(images, combos[:-1])


def test_reship_keeps_unchanged_components(tmp_path, monkeypatch):
    """A re-export into a checkout that already ships a model keeps the shipped files of every component
    whose params and configs are unchanged (orbax names files at random), takes the retrained ones, and
    writes a manifest that materialises."""
    from unclip_jax.toy import default
    from unclip_jax.weights.orbax_io import save_params

    script = _training_script()
    rng = np.random.default_rng(0)
    params = {name: {c: {"w": rng.normal(size=(3, 4)).astype(np.float16), "b": np.zeros(4, np.float16)}
                     for c in ("unet", "vae")} for name in default.NAMES}

    def full(root, params, vae_config=16):
        for name in default.NAMES:
            (root / name).mkdir(parents=True)
            (root / name / "model_index.json").write_text(json.dumps({"_class_name": "StableUnCLIPPipeline"}))
            for c, tree in params[name].items():
                (root / name / c).mkdir()
                (root / name / c / "config.json").write_text(json.dumps({"size": vae_config if c == "vae" else 1}))
                save_params(str(root / name / c / "orbax_params"), tree)
        return str(root)

    default.ship(full(tmp_path / "a", params), str(tmp_path / "shipped"))
    retrained = {name: dict(trees) for name, trees in params.items()}
    retrained["unclip"]["unet"] = {"w": params["unclip"]["unet"]["w"] + np.float16(1), "b": params["unclip"]["unet"]["b"]}
    default.ship(full(tmp_path / "b", retrained), str(tmp_path / "out"))
    out, shipped = tmp_path / "out", tmp_path / "shipped"

    def files(folder):
        return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
                for d, _, fs in os.walk(folder) for f in fs}

    assert files(out / "unclip" / "vae") != files(shipped / "unclip" / "vae")  # orbax's names differ
    kept = script.keep_unchanged_components(str(out), str(shipped))
    assert sorted(kept) == ["depth2img/unet", "depth2img/vae", "unclip/vae"]
    for component in kept:
        assert files(out / component) == files(shipped / component)
    assert files(out / "unclip" / "unet") != files(shipped / "unclip" / "unet")
    entries = default.manifest(str(out))["folders"]
    assert entries["depth2img"] == default.manifest(str(shipped))["folders"]["depth2img"]
    for name in default.NAMES:
        assert entries[name] == default.folder_entry(str(out / name), entries[name]["tokenizers"])
        monkeypatch.setenv("UNCLIP_JAX_CACHE_DIR", str(tmp_path / "cache"))
        default.pipeline_folder(name, str(out))  # every file's sha256 checked against the manifest
    # A changed config is a changed component, even with the same params.
    default.ship(full(tmp_path / "c", params, vae_config=32), str(tmp_path / "out2"))
    assert sorted(script.keep_unchanged_components(str(tmp_path / "out2"), str(shipped))) == \
        ["depth2img/unet", "unclip/unet"]
