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
"""DDIM inversion as a call: :func:`ddim_invert` runs the library's one loop with the inverse DDIM step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.networks.schedulers import DDIMScheduler

from monai_cfx.networks.schedulers import DDIMInverseScheduler, check_strength

from .sampling import KeepSamples, SamplingHook, SamplingState, _run_loop, check_loop_inputs

__all__ = ["ddim_invert"]

InversionCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class _Callback(SamplingHook):
    """``callback(step_index, timestep, sample, model_output)`` after each step: :func:`ddim_invert`'s callback."""

    def __init__(self, callback: InversionCallback) -> None:
        self.callback = callback

    def after_step(self, state: SamplingState) -> None:
        self.callback(state.step_index, int(state.timestep), state.sample, state.model_output)


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
    hooks: Sequence[SamplingHook] = (),
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Invert deterministic DDIM sampling: map ``latent`` to the noise that DDIM sampling maps back to it.

    The library's one loop (:func:`~monai_cfx.inferers.denoise`) run with a
    :class:`~monai_cfx.networks.schedulers.DDIMInverseScheduler`, i.e.
    :func:`~monai_cfx.networks.schedulers.ddim_inversion_step` over
    :func:`~monai_cfx.networks.schedulers.inversion_timesteps` (ascending) under ``torch.no_grad()``, so every step
    hook works here too; step
    ``t`` evaluates the model on the current sample at timestep ``t`` and undoes ``scheduler.step(..., t, ...)``
    (Song et al. 2021, eq. 12, run backwards as in Dhariwal & Nichol 2021, App. F / Mokady et al. 2023, eq. 6).
    The only approximation is that the model sees the sample at level ``t - T // N`` rather than ``t``, so the
    reconstruction error shrinks as ``num_inference_steps`` grows. Afterwards ``scheduler.timesteps`` holds the
    ``N``-step sampling schedule; an inversion of ``k`` steps is undone by sampling over
    ``scheduler.timesteps[N - k:]`` with ``eta=0`` and the same conditioning.

    With ``uncond_context`` and ``context`` both given, classifier-free guidance runs one model call per step on
    the batch ``[uncond, cond]`` and uses ``out_uncond + guidance_scale * (out_cond - out_uncond)``: 0 follows
    the unconditional branch (the conditional one still runs, e.g. for attention hooks), and 1 runs the
    conditional branch alone, as sampling does.
    The model's train/eval mode is left as it is: put it in eval mode first.

    Args:
        model: network with MONAI ``DiffusionModelUNet``'s contract ``model(x, timesteps, context=None,
            class_labels=None) -> Tensor``; ``timesteps`` is passed as MONAI's ``DiffusionInferer.sample`` passes it,
            a float tensor of shape ``(1,)`` that broadcasts over the batch.
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
        fixed_point_iterations: extra model evaluations per step (``after_model`` hooks see each) that re-solve
            ``x_t = inverse(x_p, model(x_t, t))`` by fixed-point iteration (as in Pan et al. 2023, "Effective real
            image editing with accelerated iterative diffusion inversion"), removing the one-level-early
            approximation: each iteration costs one more model call per step and shrinks the round-trip error. 0 is
            plain DDIM inversion.
        timestep_spacing: ``"linspace"`` (MONAI's), ``"leading"`` or ``"trailing"``
            (:func:`~monai_cfx.networks.schedulers.set_timestep_spacing`); sampling back must use the same schedule,
            which this call leaves on ``scheduler``.
        hooks: :class:`~monai_cfx.inferers.SamplingHook`\\ s run at every inversion step (attention capture,
            conditioning changes, ...).

    Returns:
        The inverted latent, or ``(inverted_latent, trajectory)`` when ``return_trajectory`` is True.

    Raises:
        ValueError: for a non-DDIM scheduler, a latent that is not a finite float 4D/5D tensor, a step count
            outside ``[1, num_train_timesteps]``, ``end_fraction`` outside ``(0, 1]``, a non-finite
            ``guidance_scale``, ``uncond_context`` without ``context``, or conditioning of the wrong batch size.

    Example::

        scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
        noise = ddim_invert(unet, scheduler, latent, num_inference_steps=50, verbose=False)
        reconstruction = denoise(unet, scheduler, noise, verbose=False)  # sampling back reconstructs latent
    """
    inverse = DDIMInverseScheduler(scheduler)
    end_fraction = check_strength("end_fraction", end_fraction)
    # scheduler.timesteps stay on the CPU (MONAI's default), where step() indexes alphas_cumprod with them
    inverse.set_timesteps(num_inference_steps, timestep_spacing)
    timesteps = inverse.head(end_fraction)
    checked = check_loop_inputs(
        latent,
        len(timesteps),
        context,
        uncond_context,
        guidance_scale,
        class_labels,
        fixed_point_iterations=fixed_point_iterations,
        sample_name="latent",
    )
    trajectory = KeepSamples() if return_trajectory else None
    all_hooks = [*hooks, *([trajectory] if trajectory is not None else [])]
    if callback is not None:
        all_hooks.append(_Callback(callback))
    progress = "DDIM inversion" if verbose else None
    noise = _run_loop(model, inverse, latent, timesteps, hooks=all_hooks, progress_description=progress, **checked)
    if trajectory is not None:
        return noise, [latent, *(trajectory.samples[i] for i in range(len(timesteps)))]
    return noise
