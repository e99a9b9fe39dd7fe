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

__all__ = ["check_finite", "check_image_pair", "check_images", "check_option"]


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


def check_images(name: str, images: Any, min_count: int = 1) -> torch.Tensor:
    """Return ``images`` if it is a ``(N, C, H, W)`` or ``(N, C, H, W, D)`` tensor of at least ``min_count`` images,
    else raise a ``ValueError`` naming ``name``."""
    if not isinstance(images, torch.Tensor) or images.ndim not in (4, 5):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"`{name}` must be a (N, C, H, W) or (N, C, H, W, D) tensor, got {shape}.")
    if images.shape[0] < min_count:
        raise ValueError(f"`{name}` must hold at least {min_count} image(s), got {images.shape[0]}.")
    return images


def check_image_pair(generated: Any, target: Any, min_count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(generated, target)`` if both are image batches (:func:`check_images`) of the same
    ``(C, *spatial)`` shape, else raise a ``ValueError`` naming them."""
    generated = check_images("generated", generated, min_count)
    target = check_images("target", target, min_count)
    if generated.shape[1:] != target.shape[1:]:
        raise ValueError(
            "`generated` and `target` must have the same (C, *spatial) shape, got "
            f"{tuple(generated.shape[1:])} and {tuple(target.shape[1:])}."
        )
    return generated, target
