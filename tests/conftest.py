"""Shared test fixtures: offline reference material built once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The sharding tests need 8 devices: 8 CPU devices, set before JAX starts. Single-device tests run as fast
# with them (tests/test_unet.py: 56 s of CPU with one device, 57 s with eight).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def real_config(name: str) -> dict:
    """A real checkpoint's config.json kept under tests/fixtures/configs/."""
    with open(FIXTURES / "configs" / name) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="session")
def clip_tokenizer_dirs(fixture_dir) -> dict[str, Path]:
    """Tokenizer folders in the real layout: OpenAI's (pads with EOS) and SD 2.x's (pads with "!")."""
    from unclip_jax.tokenizer import write_clip_tokenizer

    out = {}
    for name, pad in (("openai", "<|endoftext|>"), ("sd2", "!")):
        path = fixture_dir / f"tokenizer_{name}"
        write_clip_tokenizer(str(path), pad_token=pad)
        out[name] = path
    return out


@pytest.fixture(scope="session")
def pipeline_dirs(fixture_dir):
    """Builds (once per session, on first use) tiny diffusers pipeline folders, random weights:
    `pipeline_dirs("unclip" | "unclip_img2img" | "depth2img", shape="a" | "b")` -> folder."""
    import pipeline_fixtures

    built: dict[tuple[str, str], Path] = {}

    def get(kind: str, shape: str = "a") -> Path:
        if (kind, shape) not in built:
            build = getattr(pipeline_fixtures, f"build_{kind}")
            built[kind, shape] = build(fixture_dir / f"{kind}_{shape}", shape)
        return built[kind, shape]

    return get


_PAIRS = {
    "unclip": ("StableUnCLIPPipeline", "StableUnCLIPPipeline"),
    "unclip_img2img": ("StableUnCLIPImg2ImgPipeline", "StableUnCLIPImg2ImgPipeline"),
    "depth2img": ("StableDiffusionDepth2ImgPipeline", "StableDiffusionDepth2ImgPipeline"),
}


@pytest.fixture(scope="session")
def pipeline_pairs(pipeline_dirs):
    """`pipeline_pairs(kind, shape)` -> (diffusers pipeline, our pipeline, our params) loaded from the same
    fixture folder, once per session."""
    cache: dict = {}

    def get(kind: str, shape: str = "a"):
        if (kind, shape) not in cache:
            import diffusers

            import unclip_jax

            folder = str(pipeline_dirs(kind, shape))
            ref_name, our_name = _PAIRS[kind]
            ref = getattr(diffusers, ref_name).from_pretrained(folder)
            ref.set_progress_bar_config(disable=True)
            # diffusers 0.42 reaches for `text_encoder.text_model` under clip_skip, which transformers v5's
            # flat CLIPTextModel lacks: alias it (outside torch's module registry) so the reference runs.
            object.__setattr__(ref.text_encoder, "text_model", ref.text_encoder)
            cache[kind, shape] = (ref, *getattr(unclip_jax, our_name).from_pretrained(folder))
        return cache[kind, shape]

    return get


@pytest.fixture(scope="session")
def unclip_pipeline_dir(pipeline_dirs) -> Path:
    return pipeline_dirs("unclip")


@pytest.fixture(scope="session")
def unclip_img2img_pipeline_dir(pipeline_dirs) -> Path:
    return pipeline_dirs("unclip_img2img")


@pytest.fixture(scope="session")
def depth2img_pipeline_dir(pipeline_dirs) -> Path:
    return pipeline_dirs("depth2img")
