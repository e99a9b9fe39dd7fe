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
"""Deterministic DDIM inversion for MONAI's ``DDIMScheduler``, as a step that the library's one loop runs: map an
image (or latent) back to the noise that DDIM sampling turns into it again, in 2D and 3D.

DDIM sampling with ``eta=0`` (Song et al. 2021, eq. 12) is a deterministic map from noise to data; running it
backwards (Dhariwal & Nichol 2021, App. F; Mokady et al. 2023, eq. 6) recovers the noise of a given image, which
is the starting point for editing it (counterfactuals) or for reading out the model's attention (grounding).

Unlike ``DDIMScheduler.reversed_step`` this module inverts each sampling step *exactly* (for a fixed model
output) and never indexes ``alphas_cumprod`` past its end, so the inversion can run all the way to ``t = T - 1``.
:class:`DDIMInverseScheduler` packages the step as a scheduler (as diffusers' ``DDIMInverseScheduler``), which
:func:`monai_cfx.inferers.denoise` runs like any other; :func:`monai_cfx.inferers.ddim_invert` is the
convenience call.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch
from monai.networks.schedulers import DDIMScheduler
from monai.networks.schedulers.ddpm import DDPMPredictionType

from .spacing import check_ddim_scheduler, check_strength, set_timestep_spacing, strength_steps

__all__ = ["DDIMInverseScheduler", "ddim_inversion_step", "inversion_timesteps"]


def inversion_timesteps(
    scheduler: DDIMScheduler,
    num_inference_steps: int,
    end_fraction: float = 1.0,
    device: str | torch.device | None = None,
    spacing: str = "linspace",
) -> torch.Tensor:
    """Set ``scheduler`` to ``num_inference_steps`` steps and return the ascending timesteps that inversion visits.

    Inversion step ``t`` undoes the sampling step ``scheduler.step(..., t, ...)``, so the inversion timesteps are
    ``scheduler.timesteps`` in reverse order (e.g. ``0, 20, 41, ..., 999`` for 50 of 1000 steps), truncated to the
    first ``k = strength_steps(end_fraction, num_inference_steps)`` of them. An inversion that stopped after ``k``
    steps ends at noise level ``timesteps[-1]``; sampling back from there runs the last ``k`` sampling steps,
    ``scheduler.timesteps[num_inference_steps - k:]``, which this call leaves set on ``scheduler``.

    Args:
        scheduler: MONAI ``DDIMScheduler``; its ``set_timesteps`` is called (this mutates the scheduler).
        num_inference_steps: number of DDIM steps of the full schedule, in ``[1, num_train_timesteps]``.
        end_fraction: fraction of the schedule to invert, in ``(0, 1]``; 1 goes all the way to noise.
        device: device for the returned timesteps (and ``scheduler.timesteps``).
        spacing: ``"linspace"`` (MONAI's), ``"leading"`` or ``"trailing"``; see :func:`set_timestep_spacing`.

    Returns:
        Long tensor of the ``k`` ascending timesteps.

    Example::

        timesteps = inversion_timesteps(scheduler, 50, end_fraction=0.3)  # 15 steps: 0, 20, ..., 285
        back = scheduler.timesteps[50 - len(timesteps):]  # the matching sampling steps: 285, ..., 0
    """
    end_fraction = check_strength("end_fraction", end_fraction)
    set_timestep_spacing(scheduler, num_inference_steps, spacing, device)
    return scheduler.timesteps.flip(0)[: strength_steps(end_fraction, num_inference_steps)]


def ddim_inversion_step(
    scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM inversion step: the exact algebraic inverse of ``scheduler.step(..., eta=0)``.

    ``scheduler.step(model_output, timestep, x_t)`` moves a sample from noise level ``t = timestep`` to
    ``p = t - T // N`` with DDIM's eq. 12 (Song et al. 2021, ``eta = 0``)::

        x_p = sqrt(a_p) * x0 + sqrt(1 - a_p) * eps

    where ``(x0, eps)`` are read from ``model_output`` (the model evaluated at level ``t``) and
    ``a = alphas_cumprod`` (``a_p = final_alpha_cumprod`` when ``p < 0``). This function takes ``sample = x_p``
    and returns the ``x_t`` that ``step`` maps back onto it, for the same ``model_output`` -- i.e. the inversion
    update of Dhariwal & Nichol 2021 (App. F) and Mokady et al. 2023 (eq. 6), ``x_t = sqrt(a_t) x0 +
    sqrt(1 - a_t) eps``, with ``(x0, eps)`` chosen so that ``step(model_output, t, x_t) == x_p`` holds
    algebraically. Per ``scheduler.prediction_type``:

    - ``epsilon``: ``eps = model_output``; ``x0 = (x_p - sqrt(1 - a_p) eps) / sqrt(a_p)`` (read at the sample's
      own level ``p``, since ``eps`` does not depend on the level).
    - ``sample``: ``x0 = model_output``; ``eps = (x_p - sqrt(a_p) x0) / sqrt(1 - a_p)``. ``step`` converts with
      ``a_t`` (the level the model was told), so ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` reproduces this ``eps``.
    - ``v_prediction``: ``step`` converts with ``a_t``: ``x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v``,
      ``eps = sqrt(a_t) v + sqrt(1 - a_t) x_t``. Writing ``a = cos^2(phi)``, ``step`` is then the rotation
      ``x_p = cos(phi_t - phi_p) x_t - sin(phi_t - phi_p) v``, which is inverted exactly.

    Unlike ``DDIMScheduler.reversed_step`` (which evaluates ``a`` at ``t + T // N`` and indexes past the end of
    ``alphas_cumprod`` at the last step) only ``alphas_cumprod[t]`` and ``alphas_cumprod[t - T // N]`` are read.

    With ``scheduler.clip_sample`` the predicted ``x0`` is clamped as in ``step``. ``step`` is then not one-to-one
    and this function returns the ``x_t`` whose ``step`` comes closest to ``sample``: exact for ``sample`` and
    ``v_prediction`` (the clamped region is solved piecewise; ``step`` stays strictly increasing there while
    ``a_p < 1``); for ``epsilon`` elements whose ``x0`` falls outside the range are projected onto it, as ``step``
    can never produce them. In the degenerate case ``sample`` prediction with ``a_p == 1`` (``step`` returns the
    model's ``x0`` whatever its input) the sample is returned unchanged.

    Args:
        scheduler: MONAI ``DDIMScheduler`` after ``set_timesteps(N)``.
        model_output: model output for ``sample`` at ``timestep``, same shape as ``sample``.
        timestep: the sampling timestep ``t`` being undone, in ``[0, num_train_timesteps)``.
        sample: the current sample ``x_p``, at noise level ``t - num_train_timesteps // N``.

    Returns:
        ``(next_sample, pred_original_sample)``: ``x_t`` and the (clamped) ``x0`` that ``step`` would predict
        from it.

    Example::

        scheduler.set_timesteps(50)
        x_t, x0 = ddim_inversion_step(scheduler, eps, 20, x_0)  # from level 0 to level 20
        x_back, _ = scheduler.step(eps, 20, x_t)  # == x_0 for the same eps
    """
    scheduler = check_ddim_scheduler(scheduler)
    if model_output.shape != sample.shape:
        raise ValueError(
            f"`model_output` must have the shape of `sample` {tuple(sample.shape)}, got {tuple(model_output.shape)}."
        )
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"`timestep` must be a single timestep, got a tensor of shape {tuple(timestep.shape)}.")
        timestep = int(timestep.item())
    if not isinstance(timestep, Integral) or not 0 <= int(timestep) < scheduler.num_train_timesteps:
        raise ValueError(f"`timestep` must be an int in [0, {scheduler.num_train_timesteps}), got {timestep!r}.")
    return _inverse_step(scheduler, model_output, int(timestep), sample)


def _inverse_step(
    scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int, sample: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ddim_inversion_step` on checked arguments (see there for the derivation)."""
    prev_timestep = timestep - scheduler.num_train_timesteps // scheduler.num_inference_steps
    # Python floats (double precision) keep the sample's dtype and device and avoid per-step device syncs
    alpha_t = float(scheduler.alphas_cumprod[timestep])
    alpha_p = float(scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod)
    sqrt_a_t, sqrt_b_t = math.sqrt(alpha_t), math.sqrt(1.0 - alpha_t)
    sqrt_a_p, sqrt_b_p = math.sqrt(alpha_p), math.sqrt(max(1.0 - alpha_p, 0.0))
    clip_min, clip_max = scheduler.clip_sample_values
    prediction_type = scheduler.prediction_type

    if prediction_type == DDPMPredictionType.EPSILON:
        pred_epsilon = model_output
        pred_original_sample = (sample - sqrt_b_p * pred_epsilon) / sqrt_a_p
        if scheduler.clip_sample:
            # step can only produce x_p whose x0 lies in the clip range: project onto that image
            pred_original_sample = pred_original_sample.clamp(clip_min, clip_max)
        next_sample = sqrt_a_t * pred_original_sample + sqrt_b_t * pred_epsilon
        return next_sample, pred_original_sample

    if prediction_type == DDPMPredictionType.SAMPLE:
        # step clamps x0 but derives eps from the unclamped output, so x_t is rebuilt from the unclamped one
        pred_original_sample = model_output.clamp(clip_min, clip_max) if scheduler.clip_sample else model_output
        if sqrt_b_p == 0.0:
            # step(x_t) == x0 for every x_t here: no inverse exists, keep the sample where it is
            return sample, pred_original_sample
        pred_epsilon = (sample - sqrt_a_p * pred_original_sample) / sqrt_b_p
        next_sample = sqrt_a_t * model_output + sqrt_b_t * pred_epsilon
        return next_sample, pred_original_sample

    # v_prediction: step(x_t) = cos(d) x_t - sin(d) v with d = phi_t - phi_p, a = cos^2(phi)
    cos_d = sqrt_a_t * sqrt_a_p + sqrt_b_t * sqrt_b_p
    sin_d = sqrt_b_t * sqrt_a_p - sqrt_a_t * sqrt_b_p
    next_sample = (sample + sin_d * model_output) / cos_d
    if scheduler.clip_sample:
        # where x0 is clamped to a bound b, step(x_t) = sqrt(a_p) b + sqrt(1 - a_p) eps(x_t) is still increasing in
        # x_t (for a_p < 1), and by monotonicity the solution lies in that clamped piece exactly when the unclamped
        # solution's x0 lies beyond b; for a_p == 1 that piece is flat, so take its edge (x0 == b)
        unclamped_x0 = sqrt_a_t * next_sample - sqrt_b_t * model_output
        for bound, beyond in ((clip_min, unclamped_x0 < clip_min), (clip_max, unclamped_x0 > clip_max)):
            if sqrt_b_p > 0.0:
                solution = ((sample - sqrt_a_p * bound) / sqrt_b_p - sqrt_a_t * model_output) / sqrt_b_t
            else:
                solution = (bound + sqrt_b_t * model_output) / sqrt_a_t
            next_sample = torch.where(beyond, solution, next_sample)
    pred_original_sample = sqrt_a_t * next_sample - sqrt_b_t * model_output
    if scheduler.clip_sample:
        pred_original_sample = pred_original_sample.clamp(clip_min, clip_max)
    return next_sample, pred_original_sample


class DDIMInverseScheduler:
    """The inverse of a MONAI ``DDIMScheduler``'s sampling steps, as a scheduler that the library's one loop
    (:func:`monai_cfx.inferers.denoise`) runs: its :attr:`timesteps` ascend and its :meth:`step` is
    :func:`ddim_inversion_step`, so every :class:`~monai_cfx.inferers.SamplingHook` works during an inversion as
    during sampling (as diffusers' ``DDIMInverseScheduler``, but exact and never past the schedule's ends).

    The schedule is the wrapped scheduler's: set it with :meth:`set_timesteps` (or the scheduler's own
    ``set_timesteps``); sampling back over ``scheduler.timesteps[N - k:]`` undoes an inversion of ``k`` steps.

    Args:
        scheduler: the MONAI ``DDIMScheduler`` whose steps are inverted (shared, not copied).

    Raises:
        ValueError: when ``scheduler`` is not a ``DDIMScheduler`` with a known ``prediction_type``.

    Example::

        inverse = DDIMInverseScheduler(scheduler)
        inverse.set_timesteps(50, spacing="trailing")
        noise = denoise(unet, inverse, latent, context=empty)  # then denoise(unet, scheduler, noise, ...) returns
    """

    def __init__(self, scheduler: DDIMScheduler) -> None:
        self.scheduler = check_ddim_scheduler(scheduler)

    def set_timesteps(
        self, num_inference_steps: int, spacing: str = "linspace", device: str | torch.device | None = None
    ) -> torch.Tensor:
        """Set the wrapped scheduler to ``num_inference_steps`` steps spaced by ``spacing``
        (:func:`~monai_cfx.networks.schedulers.set_timestep_spacing`) and return :attr:`timesteps`."""
        set_timestep_spacing(self.scheduler, num_inference_steps, spacing, device)
        return self.timesteps

    @property
    def timesteps(self) -> torch.Tensor:
        """The ascending timesteps that inversion visits: the sampling timesteps in reverse order."""
        return self.scheduler.timesteps.flip(0)

    def head(self, strength: float) -> torch.Tensor:
        """The first :func:`~monai_cfx.networks.schedulers.strength_steps` timesteps: an inversion to noise level
        ``strength`` of the schedule (``strength`` is trusted: check it where it enters)."""
        return self.timesteps[: strength_steps(strength, self.scheduler.num_inference_steps)]

    def step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Undo ``scheduler.step(model_output, timestep, x_t)``: return ``(x_t, pred_original_sample)`` from
        ``sample = x_p`` (:func:`ddim_inversion_step`, trusting the loop's arguments)."""
        return _inverse_step(self.scheduler, model_output, int(timestep), sample)
