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
"""Deterministic DDIM inversion for MONAI's ``DDIMScheduler``: map an image (or latent) back to the noise that
DDIM sampling turns into it again, in 2D and 3D.

DDIM sampling with ``eta=0`` (Song et al. 2021, eq. 12) is a deterministic map from noise to data; running it
backwards (Dhariwal & Nichol 2021, App. F; Mokady et al. 2023, eq. 6) recovers the noise of a given image, which
is the starting point for editing it (counterfactuals) or for reading out the model's attention (grounding).

Unlike ``DDIMScheduler.reversed_step`` this module inverts each sampling step *exactly* (for a fixed model
output) and never indexes ``alphas_cumprod`` past its end, so the inversion can run all the way to ``t = T - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real

import torch
from monai.networks.schedulers import DDIMScheduler
from monai.networks.schedulers.ddpm import DDPMPredictionType
from monai.utils import optional_import

from monai_cfx.utils import check_finite, check_option

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["TIMESTEP_SPACINGS", "ddim_inversion_step", "ddim_invert", "inversion_timesteps", "set_timestep_spacing"]

# "linspace" is MONAI's DDIMScheduler.set_timesteps; "leading" and "trailing" as in diffusers (Lin et al. 2024,
# table 2). monai-generative's DDIMScheduler, used by published MONAI work, spaced "leading".
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

InversionCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _check_scheduler(scheduler: object) -> DDIMScheduler:
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(
            f"`scheduler` must be a monai.networks.schedulers.DDIMScheduler, got {type(scheduler).__name__}."
        )
    check_option("scheduler.prediction_type", scheduler.prediction_type, [p.value for p in DDPMPredictionType])
    return scheduler


def _check_num_inference_steps(scheduler: DDIMScheduler, num_inference_steps: object) -> int:
    valid = isinstance(num_inference_steps, Integral) and not isinstance(num_inference_steps, bool)
    if not valid or not 1 <= int(num_inference_steps) <= scheduler.num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps` must be an int in [1, {scheduler.num_train_timesteps}] "
            f"(the scheduler's num_train_timesteps), got {num_inference_steps!r}."
        )
    return int(num_inference_steps)


def _check_end_fraction(end_fraction: object) -> float:
    valid = isinstance(end_fraction, Real) and not isinstance(end_fraction, bool)
    if not valid or not 0.0 < float(end_fraction) <= 1.0:
        raise ValueError(f"`end_fraction` must be a number in (0, 1], got {end_fraction!r}.")
    return float(end_fraction)


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
    scheduler = _check_scheduler(scheduler)
    num_inference_steps = _check_num_inference_steps(scheduler, num_inference_steps)
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
    first ``k = max(1, round(end_fraction * num_inference_steps))`` of them. An inversion that stopped after ``k``
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
    end_fraction = _check_end_fraction(end_fraction)
    set_timestep_spacing(scheduler, num_inference_steps, spacing, device)
    num_steps = max(1, round(end_fraction * num_inference_steps))
    return scheduler.timesteps.flip(0)[:num_steps]


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
    scheduler = _check_scheduler(scheduler)
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
    timestep = int(timestep)

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


def _broadcast_batch(name: str, value: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Expand a batch-1 conditioning tensor to ``batch_size``; reject any other mismatching batch."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a tensor with a batch dimension, got {shape}.")
    if value.shape[0] == batch_size:
        return value
    if value.shape[0] == 1:
        return value.expand(batch_size, *value.shape[1:])
    raise ValueError(
        f"`{name}` must have batch size 1 or {batch_size} (the batch of `latent`), got shape {tuple(value.shape)}."
    )


def ddim_invert(
    model: Callable[..., torch.Tensor],
    scheduler: DDIMScheduler,
    latent: torch.Tensor,
    num_inference_steps: int,
    context: torch.Tensor | None = None,
    uncond_context: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    class_labels: torch.Tensor | None = None,
    end_fraction: float = 1.0,
    callback: InversionCallback | None = None,
    return_trajectory: bool = False,
    verbose: bool = True,
    fixed_point_iterations: int = 0,
    timestep_spacing: str = "linspace",
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Invert deterministic DDIM sampling: map ``latent`` to the noise that DDIM sampling maps back to it.

    Runs :func:`ddim_inversion_step` over :func:`inversion_timesteps` (ascending) under ``torch.no_grad()``; step
    ``t`` evaluates the model on the current sample at timestep ``t`` and undoes ``scheduler.step(..., t, ...)``
    (Song et al. 2021, eq. 12, run backwards as in Dhariwal & Nichol 2021, App. F / Mokady et al. 2023, eq. 6).
    The only approximation is that the model sees the sample at level ``t - T // N`` rather than ``t``, so the
    reconstruction error shrinks as ``num_inference_steps`` grows. Afterwards ``scheduler.timesteps`` holds the
    ``N``-step sampling schedule; an inversion of ``k`` steps is undone by sampling over
    ``scheduler.timesteps[N - k:]`` with ``eta=0`` and the same conditioning.

    With ``uncond_context`` and ``context`` both given, classifier-free guidance runs one model call per step on
    the batch ``[uncond, cond]`` and uses ``out_uncond + guidance_scale * (out_cond - out_uncond)``: 0 follows
    the unconditional branch (the conditional one still runs, e.g. for attention hooks), 1 the conditional one.
    The model's train/eval mode is left as it is: put it in eval mode first.

    Args:
        model: network with MONAI ``DiffusionModelUNet``'s contract ``model(x, timesteps, context=None,
            class_labels=None) -> Tensor``, ``timesteps`` being a long tensor of shape ``(batch,)``.
        scheduler: MONAI ``DDIMScheduler``; ``set_timesteps(num_inference_steps)`` is called on it.
        latent: clean sample, float tensor ``(B, C, H, W)`` or ``(B, C, H, W, D)``.
        num_inference_steps: number of DDIM steps ``N`` of the full schedule, in ``[1, num_train_timesteps]``.
        context: cross-attention conditioning ``(B or 1, seq, dim)`` for the conditional branch.
        uncond_context: conditioning of the unconditional branch (same trailing shape); needs ``context``.
        guidance_scale: classifier-free guidance weight, used only when ``uncond_context`` is given.
        class_labels: class labels ``(B or 1,)`` passed to both branches.
        end_fraction: fraction of the schedule to invert, in ``(0, 1]``: ``round(end_fraction * N)`` steps.
        callback: ``callback(step_index, timestep, sample, model_output)`` called after each step with the new
            sample and the (guided) model output.
        return_trajectory: also return the list of samples ``[latent, x_1, ..., x_k]``.
        verbose: show a tqdm progress bar (if tqdm is installed).
        fixed_point_iterations: extra model evaluations per step that re-solve ``x_t = inverse(x_p, model(x_t, t))``
            by fixed-point iteration (as in Pan et al. 2023, "Effective real image editing with accelerated
            iterative diffusion inversion"), removing the one-level-early approximation: each iteration costs one
            more model call per step and shrinks the round-trip error. 0 is plain DDIM inversion.
        timestep_spacing: ``"linspace"`` (MONAI's), ``"leading"`` or ``"trailing"`` (:func:`set_timestep_spacing`);
            sampling back must use the same schedule, which this call leaves on ``scheduler``.

    Returns:
        The inverted latent, or ``(inverted_latent, trajectory)`` when ``return_trajectory`` is True.

    Raises:
        ValueError: for a non-DDIM scheduler, a latent that is not a finite float 4D/5D tensor, a step count
            outside ``[1, num_train_timesteps]``, ``end_fraction`` outside ``(0, 1]``, a non-finite
            ``guidance_scale``, ``uncond_context`` without ``context``, or conditioning of the wrong batch size.

    Example::

        scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
        noise = ddim_invert(unet, scheduler, latent, num_inference_steps=50, verbose=False)
        for t in scheduler.timesteps:  # sampling back reconstructs latent
            noise, _ = scheduler.step(unet(noise, torch.full((len(noise),), t)), t, noise)
    """
    scheduler = _check_scheduler(scheduler)
    if not isinstance(latent, torch.Tensor) or not latent.is_floating_point() or latent.ndim not in (4, 5):
        described = (
            f"a {latent.dtype} tensor of shape {tuple(latent.shape)}"
            if isinstance(latent, torch.Tensor)
            else type(latent).__name__
        )
        raise ValueError(
            f"`latent` must be a float tensor (B, C, H, W) or (B, C, H, W, D) (ndim 4 or 5), got {described}."
        )
    check_finite("latent", latent)
    if not isinstance(guidance_scale, Real) or not math.isfinite(float(guidance_scale)):
        raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}.")
    if uncond_context is not None and context is None:
        raise ValueError("`uncond_context` was given without `context`: guidance needs both branches.")
    if not isinstance(fixed_point_iterations, Integral) or fixed_point_iterations < 0:
        raise ValueError(f"`fixed_point_iterations` must be an int >= 0, got {fixed_point_iterations!r}.")
    # scheduler.timesteps stay on the CPU (MONAI's default), where step() indexes alphas_cumprod with them
    timesteps: Sequence[int] = inversion_timesteps(
        scheduler, num_inference_steps, end_fraction, spacing=timestep_spacing
    ).tolist()

    batch_size = latent.shape[0]
    guided = uncond_context is not None
    model_context = None if context is None else _broadcast_batch("context", context, batch_size)
    if guided:
        uncond_context = _broadcast_batch("uncond_context", uncond_context, batch_size)
        if uncond_context.shape[1:] != model_context.shape[1:]:
            raise ValueError(
                f"`uncond_context` must match the shape of `context` {tuple(model_context.shape)} after the batch "
                f"dimension, got {tuple(uncond_context.shape)}."
            )
        model_context = torch.cat([uncond_context, model_context])
    model_class_labels = None
    if class_labels is not None:
        model_class_labels = _broadcast_batch("class_labels", class_labels, batch_size)
        if guided:
            model_class_labels = torch.cat([model_class_labels, model_class_labels])

    sample = latent
    trajectory = [latent]
    progress_bar = tqdm(timesteps, desc="DDIM inversion") if verbose and has_tqdm else iter(timesteps)

    def guided_output(current: torch.Tensor, timestep: int) -> torch.Tensor:
        model_input = torch.cat([current, current]) if guided else current
        model_timesteps = torch.full((model_input.shape[0],), timestep, device=latent.device, dtype=torch.long)
        output = model(model_input, model_timesteps, context=model_context, class_labels=model_class_labels)
        if guided:
            output_uncond, output_cond = output.chunk(2)
            output = output_uncond + guidance_scale * (output_cond - output_uncond)
        return output

    with torch.no_grad():
        for step_index, timestep in enumerate(progress_bar):
            previous = sample
            model_output = guided_output(previous, timestep)
            sample, _ = ddim_inversion_step(scheduler, model_output, timestep, previous)
            for _ in range(fixed_point_iterations):
                # evaluate the model where the sampler will (x_t, t) and re-solve the step from x_p
                model_output = guided_output(sample, timestep)
                sample, _ = ddim_inversion_step(scheduler, model_output, timestep, previous)
            if return_trajectory:
                trajectory.append(sample)
            if callback is not None:
                callback(step_index, timestep, sample, model_output)
    if return_trajectory:
        return sample, trajectory
    return sample
