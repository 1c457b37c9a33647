"""Functional schedulers: diffusers' KarrasDiffusionSchedulers and the UnCLIP scheduler.

Each is a frozen object holding its config, with an immutable state pytree and pure `set_timesteps`,
`scale_model_input`, `step` and `add_noise`. `SCHEDULERS` maps diffusers' class names (as they appear
in scheduler_config.json's `_class_name`) to ours; modules are imported when first asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from unclip_jax.schedulers.common import SchedulerConfigError, SchedulerOutput

_MODULES = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "PNDMScheduler": "pndm",
    "LMSDiscreteScheduler": "lms_discrete",
    "EulerDiscreteScheduler": "euler_discrete",
    "EulerAncestralDiscreteScheduler": "euler_ancestral_discrete",
    "HeunDiscreteScheduler": "heun_discrete",
    "KDPM2DiscreteScheduler": "k_dpm_2_discrete",
    "KDPM2AncestralDiscreteScheduler": "k_dpm_2_ancestral_discrete",
    "EDMEulerScheduler": "edm_euler",
    "DPMSolverMultistepScheduler": "dpmsolver_multistep",
    "DPMSolverSinglestepScheduler": "dpmsolver_singlestep",
    "DEISMultistepScheduler": "deis_multistep",
    "UniPCMultistepScheduler": "unipc_multistep",
    "DPMSolverSDEScheduler": "dpmsolver_sde",
    "UnCLIPScheduler": "unclip",
}


class _Registry(Mapping):
    def __getitem__(self, name: str):
        if name not in _MODULES:
            raise KeyError(name)
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)


SCHEDULERS: Mapping = _Registry()


def scheduler_from_config(config: dict, class_name: str | None = None, **overrides):
    """The scheduler a scheduler_config.json names (or `class_name`, to swap schedulers as diffusers'
    `from_config` does)."""
    name = class_name or config.get("_class_name")
    if name not in _MODULES:
        raise SchedulerConfigError(f"scheduler {name!r} is not supported; supported: {', '.join(sorted(_MODULES))}")
    return SCHEDULERS[name].from_config(config, **overrides)


def __getattr__(name: str):
    if name in _MODULES:
        return SCHEDULERS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SCHEDULERS", "SchedulerConfigError", "SchedulerOutput", "scheduler_from_config", *_MODULES]
