# Copyright (c) monai_cfx contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Timestep spacings of an ``N``-step schedule on MONAI's ``DDIMScheduler``, and the one conversion between a
fraction of the schedule (a noise strength) and a step count."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler
from monai.networks.schedulers.ddpm import DDPMPredictionType

from monai_cfx.utils import check_option

__all__ = [
    "TIMESTEP_SPACINGS",
    "check_ddim_scheduler",
    "check_num_inference_steps",
    "check_strength",
    "set_timestep_spacing",
    "strength_steps",
]

# "linspace" is MONAI's DDIMScheduler.set_timesteps; "leading" and "trailing" as in diffusers (Lin et al. 2024,
# table 2). monai-generative's DDIMScheduler, used by published MONAI work, spaced "leading".
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def check_ddim_scheduler(scheduler: object) -> DDIMScheduler:
    """Return ``scheduler`` if it is a MONAI ``DDIMScheduler`` with a known ``prediction_type``, else raise a
    ``ValueError`` naming it."""
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(
            f"`scheduler` must be a monai.networks.schedulers.DDIMScheduler, got {type(scheduler).__name__}."
        )
    check_option("scheduler.prediction_type", scheduler.prediction_type, [p.value for p in DDPMPredictionType])
    return scheduler


def check_num_inference_steps(scheduler: Any, num_inference_steps: object) -> int:
    """Return ``num_inference_steps`` as an int, or raise a ``ValueError`` unless it is in ``[1, T]`` for the
    scheduler's ``T = num_train_timesteps`` (any MONAI scheduler)."""
    valid = isinstance(num_inference_steps, Integral) and not isinstance(num_inference_steps, bool)
    if not valid or not 1 <= int(num_inference_steps) <= scheduler.num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps` must be an int in [1, {scheduler.num_train_timesteps}] "
            f"(the scheduler's num_train_timesteps), got {num_inference_steps!r}."
        )
    return int(num_inference_steps)


def check_strength(name: str, strength: object) -> float:
    """Return a fraction of a schedule (a ``noise_strength``, an inversion's ``end_fraction``) as a float, or raise
    a ``ValueError`` naming ``name`` unless it is a number in (0, 1]."""
    valid = isinstance(strength, Real) and not isinstance(strength, bool)
    if not valid or not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"`{name}` must be a number in (0, 1], got {strength!r}.")
    return float(strength)


def strength_steps(strength: float, num_inference_steps: int) -> int:
    """The steps of an ``N``-step schedule that a fraction ``strength`` of it covers, ``max(1, round(strength * N))``:
    the head of the schedule that an inversion runs to reach that noise level, and the tail that an edit (SDEdit,
    a counterfactual) denoises back from it. The one place where a strength becomes a step count."""
    return max(1, round(strength * num_inference_steps))


def set_timestep_spacing(
    scheduler: DDIMScheduler,
    num_inference_steps: int,
    spacing: str = "linspace",
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Call ``scheduler.set_timesteps(num_inference_steps)`` and space its (descending) timesteps by ``spacing``.

    ``"linspace"`` keeps MONAI's ``linspace(T - 1, 0, N)``; ``"leading"`` is ``arange(N) * (T // N)``
    (``980, ..., 20, 0`` for 50 of 1000; monai-generative's spacing); ``"trailing"`` is
    ``T - 1 - arange(N) * (T // N)`` (``999, ..., 19``), which reaches the last training level (diffusers'
    trailing spacing). ``scheduler.steps_offset`` is added to ``"leading"`` as MONAI does. MONAI's ``step`` takes
    the previous level as ``t - T // N``: the leading and trailing spacings match that exactly, and trailing then
    ends at the clean level only when ``N`` divides ``T``, so other step counts are refused for it.

    Returns:
        ``scheduler.timesteps``.

    Raises:
        ValueError: for an unknown ``spacing``, or ``"trailing"`` with ``N`` that does not divide ``T``.
    """
    scheduler = check_ddim_scheduler(scheduler)
    num_inference_steps = check_num_inference_steps(scheduler, num_inference_steps)
    check_option("spacing", spacing, TIMESTEP_SPACINGS)
    num_train_timesteps = scheduler.num_train_timesteps
    if spacing == "trailing" and num_train_timesteps % num_inference_steps:
        divisors = [n for n in range(1, num_train_timesteps + 1) if num_train_timesteps % n == 0]
        nearest = sorted(divisors, key=lambda n: abs(n - num_inference_steps))[:2]
        raise ValueError(
            f"`num_inference_steps`={num_inference_steps} must divide num_train_timesteps={num_train_timesteps} for "
            f"trailing spacing (the last step would stop short of the clean level); use e.g. {sorted(nearest)} "
            "steps, or leading spacing."
        )
    scheduler.set_timesteps(num_inference_steps, device=device)
    step_ratio = num_train_timesteps // num_inference_steps
    indices = torch.arange(num_inference_steps - 1, -1, -1, device=scheduler.timesteps.device) * step_ratio
    if spacing == "leading":
        scheduler.timesteps = indices + scheduler.steps_offset
    elif spacing == "trailing":
        scheduler.timesteps = num_train_timesteps - 1 - indices.flip(0)
    return scheduler.timesteps
