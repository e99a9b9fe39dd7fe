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
"""Measures of a latent trajectory (TehraniNasab, Kumar and Arbel, arXiv 2503.23623): the latent-direction cosine
of prompt swaps, CFRT (the target attribute changes more than every other one), monotonicity of the target
attribute along the path, and identity preservation of each frame."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
from monai.metrics import SSIMMetric

__all__ = [
    "compute_cfrt",
    "compute_identity_preservation",
    "compute_latent_direction_cosine",
    "compute_monotone_fraction",
]


def compute_latent_direction_cosine(
    neutral: torch.Tensor, swaps: torch.Tensor, reference_index: int = 0, eps: float = 1e-12
) -> torch.Tensor:
    """``cos(z_ref - z_N, z_λ - z_N)`` per swap and trajectory: how far each swap's direction from the neutral
    latent turns away from the reference swap's (the paper takes the latest swap, λ = 45, as the reference). A
    straight trajectory keeps 1; the paper's falls with λ, which is why a Bézier curve beats a straight line.

    Args:
        neutral: ``z_N`` ``(B, *latent)``.
        swaps: ``(Λ, B, *latent)``.
        reference_index: the row of ``swaps`` that gives the reference direction.
        eps: a direction shorter than this (a swap that did not move) has no angle: its cosine is NaN.

    Returns:
        ``(Λ, B)`` cosines in [-1, 1], NaN where either direction has (near) zero norm.
    """
    if swaps.ndim != neutral.ndim + 1 or swaps.shape[1:] != neutral.shape:
        raise ValueError(
            f"`swaps` must be (Λ, *neutral.shape) = (Λ, {', '.join(map(str, neutral.shape))}), "
            f"got {tuple(swaps.shape)}."
        )
    if not -swaps.shape[0] <= reference_index < swaps.shape[0]:
        raise ValueError(f"`reference_index` {reference_index} is outside the {swaps.shape[0]} swaps.")
    directions = (swaps - neutral[None]).flatten(2).double()
    reference = directions[reference_index][None]
    norms = directions.norm(dim=2) * reference.norm(dim=2)
    cosine = (directions * reference).sum(2) / norms.clamp_min(eps)
    return torch.where(norms > eps, cosine, torch.full_like(cosine, float("nan"))).float()


def _check_probabilities(probabilities: torch.Tensor, target: int) -> None:
    if not isinstance(probabilities, torch.Tensor) or probabilities.ndim != 3:
        shape = tuple(probabilities.shape) if isinstance(probabilities, torch.Tensor) else type(probabilities).__name__
        raise ValueError(f"`probabilities` must be (trajectories, frames, attributes), got {shape}.")
    if isinstance(target, bool) or not isinstance(target, Integral) or not 0 <= target < probabilities.shape[2]:
        raise ValueError(f"`target` must be an attribute index in [0, {probabilities.shape[2]}), got {target!r}.")


def _frame_slice(frame_window: Sequence[int] | None, num_frames: int) -> slice:
    if frame_window is None:
        return slice(1, num_frames)
    start, end = (int(v) for v in frame_window)
    if not 1 <= start < end <= num_frames:
        raise ValueError(
            f"`frame_window` must be (start, end) with 1 <= start < end <= {num_frames} (frame 0 is the reference), "
            f"got {tuple(frame_window)}."
        )
    return slice(start, end)


def compute_cfrt(
    probabilities: torch.Tensor, target: int, frame_window: Sequence[int] | None = (30, 50)
) -> tuple[float, torch.Tensor]:
    """CFRT: the fraction of trajectories along which the target attribute's probability rises more than every
    other attribute's, comparing the mean over ``frame_window`` with frame 0 (arXiv 2503.23623).

    Args:
        probabilities: ``(N, F, A)`` classifier probabilities of ``A`` attributes for the ``F`` frames of ``N``
            trajectories (frame 0 the neutral end).
        target: the target attribute's index.
        frame_window: ``(start, end)`` frames averaged against frame 0 (the reference: the last 20 of 50 frames);
            ``None`` takes every frame after the first.

    Returns:
        ``(cfrt, faithful)``: the fraction, and ``(N,)`` booleans per trajectory.
    """
    _check_probabilities(probabilities, target)
    window = _frame_slice(frame_window, probabilities.shape[1])
    change = probabilities[:, window].double().mean(1) - probabilities[:, 0].double()  # (N, A)
    others = torch.cat([change[:, :target], change[:, target + 1 :]], dim=1)
    faithful = (change[:, target][:, None] > others).all(dim=1) if others.shape[1] else change[:, target] > 0
    return float(faithful.double().mean()), faithful


def compute_monotone_fraction(target_probabilities: torch.Tensor, tolerance: float = 0.02) -> torch.Tensor:
    """Per trajectory, the fraction of consecutive frames along which the target attribute's probability does not
    fall by more than ``tolerance``: 1 for a path that adds the attribute steadily, lower for one that leaves the
    data manifold on the way (where the classifier's verdict jumps back and forth).

    Args:
        target_probabilities: ``(N, F)``, ``F >= 2``.
        tolerance: the fall still counted as monotone (classifier noise).

    Returns:
        ``(N,)`` fractions in [0, 1].
    """
    if target_probabilities.ndim != 2 or target_probabilities.shape[1] < 2:
        raise ValueError(f"`target_probabilities` must be (N, F >= 2), got {tuple(target_probabilities.shape)}.")
    steps = target_probabilities[:, 1:] - target_probabilities[:, :-1]
    return (steps >= -tolerance).double().mean(1).float()


def compute_identity_preservation(frames: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> dict:
    """SSIM and mean absolute difference of every frame to the trajectory's reference image (its neutral end, or
    the input scan): how much of the subject a traversal keeps.

    Args:
        frames: ``(F, N, C, *spatial)`` images, 2D or 3D.
        reference: ``(N, C, *spatial)``.
        data_range: the images' intensity range for SSIM.

    Returns:
        ``{"ssim": (F, N), "l1": (F, N)}``.
    """
    if frames.ndim != reference.ndim + 1 or frames.shape[1:] != reference.shape:
        raise ValueError(
            f"`frames` must be (F, *reference.shape) = (F, {', '.join(map(str, reference.shape))}), "
            f"got {tuple(frames.shape)}."
        )
    spatial_dims = reference.ndim - 2
    # MONAI's SSIM window (11) must fit the image; small volumes get a smaller odd window
    window = min(11, *(size if size % 2 else size - 1 for size in reference.shape[2:]))
    ssim = SSIMMetric(spatial_dims=spatial_dims, data_range=data_range, win_size=window)
    flat_frames = frames.reshape(-1, *reference.shape[1:]).float()
    flat_reference = reference[None].expand_as(frames).reshape(-1, *reference.shape[1:]).float()
    scores = ssim(flat_frames, flat_reference).reshape(frames.shape[:2])
    l1 = (flat_frames - flat_reference).abs().flatten(1).mean(1).reshape(frames.shape[:2])
    return {"ssim": scores, "l1": l1}
