"""Issue 18's criteria on the shipped default model: pictures that match their prompts.

The model is the package's (`unclip_jax.toy.default.pipeline_folder("unclip" / "depth2img")`); the tests
skip only when those weights are absent, and FAIL when a score is below the issue's threshold.
Test-only override: the environment variable UNCLIP_JAX_TEST_DEFAULT_MODEL=DIR (a folder holding
`unclip/` and `depth2img/`) tests that folder instead, for developing against other weights.

To stay CI-fast (one module-scoped evaluation, each pipeline loaded once, every stage one batched call),
the tests run on a subset, with `unclip_jax.toy.evaluate`'s sampling settings (DDIM 20 steps, prior 25):
- txt2img and the embedding decode: `evaluate.test_combos()`, 50 of the 270 palette combinations: all 10
  held-out ones plus a fixed seeded sample of 40 others (`python -m unclip_jax.toy.evaluate --full`
  gives the numbers over all 270);
- variations: 48 drawn pictures of combinations of that subset; depth2img: 48 drawn depth scenes (half
  of held-out combinations), each prompted with two other colours.

Thresholds: the issue's (colours >= 90%, shape >= 80%, variations keep shape and colours >= 80% at
noise_level 0, depth correlation >= 0.8, txt2img within 10 points of the embedding decode). Where the
issue gives no number we chose one: "moves or resizes the shape" is >= 50% of variations whose shape
box moves or changes size by > `evaluate.MOVE_PX` px; "takes the prompt's colours" is >= 80% of depth
outputs with the shapes' and the wall/ground's colours both the prompt's. The depth criterion compares
the DPT's estimate on the output with its estimate on the input (the depth the pipeline conditions on),
averaged over the scenes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from unclip_jax.toy import domain, evaluate, measure

OVERRIDE = "UNCLIP_JAX_TEST_DEFAULT_MODEL"  # test-only: a folder with unclip/ and depth2img/

COLORS_MIN = 0.90
SHAPE_MIN = 0.80
PRIOR_GAP_MAX = 0.10
VARIATION_KEPT_MIN = 0.80
VARIATION_MOVED_MIN = 0.50
DEPTH_R_MIN = 0.80
DEPTH_COLORS_MIN = 0.80


# ------------------------------------------------------------------ the evaluation's inputs (no model)


def test_subset_is_stratified():
    combos = evaluate.test_combos()
    assert len(combos) == len(set(combos)) == evaluate.TEST_COMBOS
    assert set(domain.HELD_OUT) <= set(combos)
    assert {c[0] for c in combos} == set(domain.SHAPES)
    assert evaluate.test_combos() == combos  # fixed


def test_prompts_read_as_english():
    assert domain.canonical_caption("circle", "red", "orange") == "a red circle on an orange background"
    attrs = dict(count=2, shape="square", color="red", background="blue")
    assert evaluate.recolor_prompt(attrs, "orange", "white") == "two orange squares on a white background"
    assert evaluate.recolor_prompt(dict(attrs, count=1), "green", "orange") == "a green square on an orange background"
    rng = np.random.default_rng(0)
    for _ in range(50):
        color, background = evaluate.other_colors(attrs, rng)
        assert color not in ("red", background) and background != "blue"


def test_drawn_picture_is_the_combination():
    for i, combo in enumerate(evaluate.test_combos()[:12]):
        picture = evaluate.drawn_picture(combo, i)
        got = measure.measure(picture)
        assert (got["color"], got["background"]) == combo[1:]
        np.testing.assert_array_equal(picture, evaluate.drawn_picture(combo, i))


def test_box_change():
    mask = np.zeros((64, 64), bool)
    mask[10:20, 30:36] = True
    assert measure.bounding_box(mask) == (10, 30, 20, 36)
    assert measure.bounding_box(np.zeros((8, 8), bool)) is None
    assert evaluate._box_change((10, 30, 20, 36), (14, 33, 24, 39)) == (5.0, 0.0)  # moved 3-4-5
    assert evaluate._box_change((10, 30, 20, 36), (10, 30, 20, 44)) == (4.0, 8.0)  # widened by 8


def test_scene_regions_cover_shapes_and_ground():
    for image, depth, attrs in evaluate.depth_scenes(6):
        shapes, ground = evaluate.scene_regions(image, attrs)
        assert shapes.any() and ground.any() and not (shapes & ground).any()
        # The shapes' pixels are those the drawn depth map sets to an object's disparity.
        on_object = np.isin(depth, np.float32([o["disparity"] for o in attrs["objects"]]))
        assert on_object[shapes].mean() > 0.95 and on_object[ground].mean() < 0.05


# ------------------------------------------------------------------ the shipped model


@pytest.fixture(scope="module")
def folders():
    override = os.environ.get(OVERRIDE)
    if override:
        return os.path.join(override, "unclip"), os.path.join(override, "depth2img")
    try:
        from unclip_jax.toy.default import pipeline_folder  # noqa: PLC0415
    except ImportError:
        pytest.skip("no default model in this checkout (unclip_jax.toy.default is missing)")
    try:
        out = pipeline_folder("unclip"), pipeline_folder("depth2img")
    except FileNotFoundError as e:
        pytest.skip(f"the default model's weights are absent: {e}")
    if not all(os.path.isdir(f) for f in out):
        pytest.skip(f"the default model's weights are absent: {out}")
    return out


@pytest.fixture(scope="module")
def evaluation(folders):
    """(pipelines, numbers, pictures) of `evaluate.evaluate` on the tests' subset."""
    pipes = evaluate.load(*folders)
    return (pipes, *evaluate.evaluate(pipes, evaluate.test_combos()))


@pytest.fixture(scope="module")
def results(evaluation):
    return evaluation[1]


def _wrong(result, key=None) -> str:
    """A short list of what went wrong, for failure messages."""
    bad = []
    for p in result["per_combo"]:
        if key == "shape" and p["got_shape"] != p["shape"]:
            bad.append(f"{p['prompt']!r}: {p['got_shape']} (fill {p['fill']})")
        elif key != "shape" and (p["got_color"], p["got_background"]) != (p["color"], p["background"]):
            bad.append(f"{p['prompt']!r}: {p['got_color']} on {p['got_background']}")
    return "; ".join(bad[:10]) + (f" ... ({len(bad)} in all)" if len(bad) > 10 else "")


def test_txt2img_colors(results):
    r = results["txt2img"]
    assert r["colors"] >= COLORS_MIN, f"colours right in {r['colors']:.0%} (held-out {r['held_out_colors']:.0%}): " \
                                      + _wrong(r)


def test_txt2img_shape(results):
    r = results["txt2img"]
    assert r["shape"] >= SHAPE_MIN, f"shape right in {r['shape']:.0%} (held-out {r['held_out_shape']:.0%}): " \
                                    + _wrong(r, "shape")


def test_prior_matters(results):
    t, e = results["txt2img"], results["embedding_decode"]
    for k in ("colors", "shape"):
        assert abs(t[k] - e[k]) <= PRIOR_GAP_MAX, \
            f"{k}: txt2img {t[k]:.0%} vs decoding drawn pictures' CLIP embeddings {e[k]:.0%}"


def test_variation_keeps_shape_and_colors(results):
    r = results["variation"]
    bad = [f"{p['want']} -> {p['got']}" for p in r["per_picture"] if not p["kept"]]
    assert r["kept"] >= VARIATION_KEPT_MIN, f"kept in {r['kept']:.0%}: {bad}"


def test_variation_moves_or_resizes(results):
    r = results["variation"]
    assert r["moved"] >= VARIATION_MOVED_MIN, \
        f"moved or resized in {r['moved']:.0%}: shifts {[p['shift'] for p in r['per_picture']]}, " \
        f"resizes {[p['resize'] for p in r['per_picture']]}"


def test_depth2img_keeps_layout(results):
    r = results["depth2img"]
    assert r["depth_r_mean"] >= DEPTH_R_MIN, \
        f"depth of output vs input: mean r {r['depth_r_mean']:.2f} (min {r['depth_r_min']:.2f}; vs the drawn " \
        f"depth {r['depth_r_truth_mean']:.2f}; the DPT on inputs vs drawn {r['dpt_r_truth_mean']:.2f})"


def test_depth2img_takes_prompt_colors(results):
    r = results["depth2img"]
    bad = [f"{p['prompt']!r}: {p['got']}" for p in r["per_scene"] if not p["colors"]]
    assert r["colors"] >= DEPTH_COLORS_MIN, f"prompt colours in {r['colors']:.0%}: {bad[:8]}"


def test_denoise_probe(folders):
    """The probe behind the shape diagnosis (toy README): the one-step prediction from lightly noised
    latents of drawn pictures comes back in their colours (a wrong noising or prediction formula would not)."""
    import unclip_jax as uj

    pipe, params = uj.StableUnCLIPImg2ImgPipeline.from_pretrained(folders[0])
    combos = evaluate.test_combos()[::5]
    r = evaluate.denoise_probe(pipe, params, combos, timesteps=(50, 999), batch_size=len(combos))
    assert r["timesteps"] == [50, 999] and r["n"] == len(combos) == 10
    assert r["colors"][0] >= COLORS_MIN, r
    assert r["colors"][1] < r["colors"][0] - 0.3, r  # from pure noise the picture is gone (0.08 over 50 prompts)
    assert all(0.0 <= x <= 1.0 for x in (*r["shape"], *r["colors"], r["vae_shape"])), r
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 1000\)"):
        evaluate.denoise_probe(pipe, params, combos, timesteps=(1000,))


def test_clip_probe(folders):
    """The CLIP towers' own zero-shot reading of drawn pictures (toy README: the shipped CLIP tells colours
    apart but not shapes). The colours must come out right: a probe pairing pictures with the wrong
    captions, or reading the wrong tower, would not."""
    import unclip_jax as uj

    pipes = {"txt2img": uj.StableUnCLIPPipeline.from_pretrained(folders[0]),
             "img2img": uj.StableUnCLIPImg2ImgPipeline.from_pretrained(folders[0])}
    combos = evaluate.test_combos()[::2]
    r = evaluate.clip_probe(pipes, combos)
    assert r["n"] == len(combos) == 25
    assert r["color"] >= COLORS_MIN and r["background"] >= COLORS_MIN, r
    assert 0.0 <= r["shape"] <= 1.0 and -1.0 <= r["shape_caption_cosine"] <= 1.0, r


def test_pictures_of_the_evaluation(evaluation, tmp_path):
    """`evaluate --grid / --variation-grid / --depth-grid`: what a person looks at, laid out as documented."""
    from PIL import Image

    pipes, numbers, pictures = evaluation
    paths = {k: str(tmp_path / f"{k}.png") for k in ("txt2img", "variation", "depth")}
    info = evaluate.write_grids(numbers, pictures, evaluate.test_combos(), pipes, **paths)
    grids = {k: np.asarray(Image.open(p).convert("RGB")).astype(int) for k, p in paths.items()}
    assert grids["txt2img"].shape == (3 * 64, 8 * 64, 3) and len(info["grid"]["prompts"]) == 24
    assert grids["variation"].shape == (2 * 64, 16 * 64, 3) and len(info["variation_grid"]["kept"]) == 16
    assert grids["depth"].shape == (3 * 64, 8 * 64, 3) and len(info["depth_grid"]["prompts"]) == 8
    pick = np.linspace(0, len(pictures["depth_inputs"]) - 1, 8).astype(int)
    for col, i in enumerate(pick):
        cell = np.s_[:, col * 64:(col + 1) * 64]
        assert np.abs(grids["depth"][:64][cell] - pictures["depth_inputs"][i]).max() <= 1  # inputs on top
        assert np.abs(grids["depth"][128:][cell] - pictures["depth_outputs"][i] * 255).max() <= 1  # outputs below
        depth_map = grids["depth"][64:128][cell]
        assert depth_map.min() <= 1 and depth_map.max() >= 254 and (depth_map[..., 0] == depth_map[..., 2]).all()
    first = np.linspace(0, len(pictures["variations"]) - 1, 16).astype(int)[0]
    assert np.abs(grids["variation"][:64, :64] - pictures["variation_inputs"][first]).max() <= 1
    assert np.abs(grids["variation"][:64, 64:128] - pictures["variations"][first] * 255).max() <= 1
