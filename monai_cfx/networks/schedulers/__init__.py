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
"""Pieces for MONAI's schedulers: timestep spacing, noise strength to steps, and the DDIM inversion step."""

from __future__ import annotations

from typing import Any

from .inversion import DDIMInverseScheduler, ddim_inversion_step, inversion_timesteps
from .spacing import (
    TIMESTEP_SPACINGS,
    check_ddim_scheduler,
    check_num_inference_steps,
    check_strength,
    set_timestep_spacing,
    strength_steps,
)

__all__ = [
    "DDIMInverseScheduler",
    "TIMESTEP_SPACINGS",
    "check_ddim_scheduler",
    "check_num_inference_steps",
    "check_strength",
    "ddim_inversion_step",
    "ddim_invert",
    "inversion_timesteps",
    "set_timestep_spacing",
    "strength_steps",
]


def __getattr__(name: str) -> Any:
    # ddim_invert runs the sampling loop of monai_cfx.inferers, which imports this package: resolve it lazily
    if name == "ddim_invert":
        from monai_cfx.inferers.inversion import ddim_invert

        return ddim_invert
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
