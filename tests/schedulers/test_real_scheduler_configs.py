"""Our schedulers built from the real hub scheduler configs (tests/fixtures/configs, recovered copies of
stable-diffusion-2-1-unclip's PNDM v-prediction decoder scheduler, stable-diffusion-2-depth's PNDM, the
unCLIP image-noising DDPM (inferred) and Karlo's prior UnCLIPScheduler) against diffusers built from the
same files: the inference tables and short trajectories, step by step (harness TOL, fp32)."""

from __future__ import annotations

import diffusers
import pytest
from conftest import real_config
from harness import QUIET_REFERENCE, SHAPE_2D, SHAPE_4D, run_trajectory
from test_integer_timesteps import unclip_prev

from unclip_jax.schedulers import scheduler_from_config

pytestmark = QUIET_REFERENCE


@pytest.mark.parametrize("name, n", [("scheduler_sd21_unclip.json", 20), ("scheduler_sd2_depth.json", 5),
                                     ("scheduler_image_noising_sd21_unclip.INFERRED.json", 4),
                                     ("scheduler_karlo_prior.json", 25)])
def test_real_scheduler_configs_match_diffusers(name, n, monkeypatch):
    d = real_config(name)
    ours = scheduler_from_config(d)
    ref = getattr(diffusers, d["_class_name"]).from_config(d)
    assert ours.config.prediction_type == ref.config.prediction_type
    stochastic = d["_class_name"] in ("DDPMScheduler", "UnCLIPScheduler")
    run_trajectory(ours, ref, n, shape=SHAPE_2D if stochastic else SHAPE_4D, stochastic=stochastic,
                   monkeypatch=monkeypatch if stochastic else None,
                   per_step=unclip_prev if d["_class_name"] == "UnCLIPScheduler" else None)


def test_stable_unclip_decoder_scheduler_is_pndm_v_prediction():
    d = real_config("scheduler_sd21_unclip.json")
    assert (d["_class_name"], d["prediction_type"], d["steps_offset"]) == ("PNDMScheduler", "v_prediction", 1)
    state = scheduler_from_config(d).set_timesteps(scheduler_from_config(d).create_state(), 20, shape=SHAPE_4D)
    ref = diffusers.PNDMScheduler.from_config(d)
    ref.set_timesteps(20)
    assert [int(t) for t in state.timesteps] == [int(t) for t in ref.timesteps]  # steps_offset: 951, 901, ...
