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
"""Argument checks whose errors name the argument, the value received and what was expected."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

__all__ = ["check_finite", "check_option"]


def check_option(name: str, value: Any, supported: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``supported``, else raise a ``ValueError`` naming ``name``.

    Like ``monai.utils.look_up_option`` but the message names the argument, which is what a user
    needs when several options are passed in one call.
    """
    supported = list(supported)
    if value not in supported:
        raise ValueError(f"`{name}` must be one of {supported}, got {value!r}.")
    return value


def check_finite(name: str, value: torch.Tensor | np.ndarray) -> None:
    """Raise a ``ValueError`` naming ``name`` if ``value`` holds NaN or infinity."""
    finite = torch.isfinite(value).all() if isinstance(value, torch.Tensor) else np.isfinite(value).all()
    if not bool(finite):
        raise ValueError(f"`{name}` must be finite, got a tensor with NaN or Inf values (shape {tuple(value.shape)}).")
