"""The pipelines' shared pieces: model-free argument checks, the loop driver, the guidance batch, typed inputs."""

import math

import numpy as np
import pytest

from unclip_jax.pipelines import checks


@pytest.mark.parametrize("call, error, message", [
    (lambda: checks.check_count(0, "num_inference_steps"), ValueError, "num_inference_steps must be at least 1; got 0"),
    (lambda: checks.check_count(2.0, "--steps"), TypeError, "--steps must be an integer; got float"),
    (lambda: checks.check_count(True, "n"), TypeError, "n must be an integer"),
    (lambda: checks.check_finite_real(math.nan, "guidance_scale"), ValueError, "guidance_scale must be a finite number"),
    (lambda: checks.check_finite_real(-math.inf, "g"), ValueError, "g must be a finite number; got -inf"),
    (lambda: checks.check_finite_real("7", "guidance_scale"), TypeError, "guidance_scale must be a number; got str"),
    (lambda: checks.check_side(36, "height"), ValueError, "height must be a positive multiple of 8; got 36"),
    (lambda: checks.check_side(0, "--size"), ValueError, "--size must be a positive multiple of 8; got 0"),
    (lambda: checks.check_side(-8, "width"), ValueError, "width must be a positive multiple of 8"),
    (lambda: checks.check_size(32, 30, 2 * 8), ValueError, "height must be a positive multiple of 16; got 32|width"),
    (lambda: checks.check_strength(0), ValueError, r"strength must be in \(0, 1\]; got 0"),
    (lambda: checks.check_strength(1.01), ValueError, r"strength must be in \(0, 1\]"),
    (lambda: checks.check_strength(math.nan), ValueError, "strength must be a finite number"),
    (lambda: checks.check_eta(-0.5), ValueError, "eta must be >= 0; got -0.5"),
    (lambda: checks.check_noise_level(1000, 1000), ValueError, r"noise_level must be in \[0, 999\]; got 1000"),
    (lambda: checks.check_noise_level(-1, None, "--noise-level"), ValueError, "--noise-level must be >= 0; got -1"),
    (lambda: checks.check_noise_level(1.5, 1000), TypeError, "noise_level must be an integer"),
    (lambda: checks.check_pixels(3000, 4000), ValueError, "image is 4000x3000 = 12,000,000 pixels, past the budget"),
    (lambda: checks.check_max_pixels(0), ValueError, "max_pixels must be at least 1"),
])
def test_checks_refuse(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_checks_accept():
    checks.check_count(np.int64(3), "n")
    checks.check_finite_real(np.float32(7.5), "guidance_scale")
    checks.check_size(768, 512)
    checks.check_side(36, "height", factor=2)
    checks.check_strength(1.0)
    checks.check_eta(0.0)
    checks.check_noise_level(0, 1000)
    checks.check_noise_level(999, 1000)
    checks.check_pixels(1024, 1024)
    checks.check_pixels(4000, 3000, max_pixels=None)
    checks.check_max_pixels(None)
