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
"""The library's one reverse-diffusion loop, with small step hooks.

Counterfactuals, Latent Drifting, prompt swapping and classifier guidance differ only in what they do
around a step, so they are written as :class:`SamplingHook`\\ s on this loop rather than as copies of it
(as diffusers' ``callback_on_step_end``). Without hooks and guidance the loop is exactly MONAI's
``DiffusionInferer.sample`` (same model calls, same scheduler steps, same random draws).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.schedulers import Scheduler
from monai.utils import optional_import

from monai_cfx.utils import check_finite

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["SamplingHook", "SamplingState", "denoise", "seeded_noise"]


def seeded_noise(
    shape: Sequence[int],
    seeds: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Standard normal noise ``(len(seeds), *shape)``, item ``i`` drawn from its own CPU generator seeded with
    ``seeds[i]``: the same on every device and whatever batch the item is in."""
    noise = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    return torch.stack(noise).to(device)


@dataclass
class SamplingState:
    """What a hook sees and may change at one reverse step.

    Hooks may replace ``context``, ``uncond_context`` and ``guidance_scale`` in ``before_model`` (e.g. a
    prompt swap at step λ) and ``sample`` or ``model_output`` in ``after_model`` / ``after_step``.
    """

    step_index: int
    num_steps: int
    timestep: torch.Tensor
    sample: torch.Tensor
    context: torch.Tensor | None
    uncond_context: torch.Tensor | None
    guidance_scale: float
    class_labels: torch.Tensor | None = None
    model_output: torch.Tensor | None = None
    pred_original_sample: torch.Tensor | None = None


class SamplingHook:
    """Base class of step hooks; override only the phases you need. Called in list order."""

    def before_model(self, state: SamplingState) -> None:
        """Before the network call: change the conditioning or the guidance scale."""

    def after_model(self, state: SamplingState) -> None:
        """After the (guided) network call, before the scheduler step: change ``state.model_output``."""

    def after_step(self, state: SamplingState) -> None:
        """After the scheduler step: change ``state.sample`` (drift, region blending, ...)."""


def _guided_output(model: torch.nn.Module, state: SamplingState) -> torch.Tensor:
    """Model output with classifier-free guidance, ``uncond + s * (cond - uncond)`` (Ho & Salimans 2022)."""
    timesteps = torch.Tensor((state.timestep,)).to(state.sample.device)  # as MONAI's DiffusionInferer.sample
    guided = state.uncond_context is not None and state.guidance_scale != 1.0
    if not guided:
        return model(state.sample, timesteps=timesteps, context=state.context, class_labels=state.class_labels)
    labels = None if state.class_labels is None else torch.cat([state.class_labels] * 2)
    output = model(
        torch.cat([state.sample] * 2),
        timesteps=timesteps,
        context=torch.cat([state.uncond_context, state.context]),
        class_labels=labels,
    )
    output_uncond, output_cond = output.chunk(2)
    return output_uncond + state.guidance_scale * (output_cond - output_uncond)


@torch.no_grad()
def denoise(
    model: torch.nn.Module,
    scheduler: Scheduler,
    sample: torch.Tensor,
    timesteps: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    uncond_context: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    class_labels: torch.Tensor | None = None,
    hooks: Sequence[SamplingHook] = (),
    verbose: bool = True,
) -> torch.Tensor:
    """Run reverse diffusion from ``sample`` over ``timesteps`` (default: all of ``scheduler.timesteps``).

    Args:
        model: denoiser with MONAI ``DiffusionModelUNet``'s contract ``model(x, timesteps, context, class_labels)``.
        scheduler: a MONAI scheduler after ``set_timesteps``.
        sample: the starting (noisy) sample ``(B, C, *spatial)``, 2D or 3D.
        timesteps: a tail of ``scheduler.timesteps`` to start part-way (SDEdit, inversion); default all.
        context: cross-attention conditioning ``(B, L, D)``.
        uncond_context: conditioning of the unconditional branch (e.g. the empty prompt); with it and a
            ``guidance_scale`` other than 1 each step runs one batched call on ``[uncond, cond]``.
        guidance_scale: classifier-free guidance weight; 1 is plain conditional sampling.
        class_labels: optional class labels for the network.
        hooks: :class:`SamplingHook`\\ s run at every step.
        verbose: show a tqdm progress bar.

    Returns:
        the denoised sample.

    Example::

        scheduler.set_timesteps(50)
        latent = denoise(unet, scheduler, torch.randn(4, 3, 16, 16), context=text, uncond_context=empty,
                         guidance_scale=3.0)
    """
    if not isinstance(sample, torch.Tensor) or sample.ndim not in (4, 5):
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        raise ValueError(f"`sample` must be a (B, C, H, W) or (B, C, H, W, D) tensor, got {shape}.")
    check_finite("sample", sample)
    if uncond_context is not None and context is None:
        raise ValueError("`uncond_context` was given without `context`: guidance needs both branches.")
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    state = SamplingState(0, len(timesteps), timesteps[0], sample, context, uncond_context, float(guidance_scale))
    state.class_labels = class_labels
    progress = tqdm(timesteps, desc="sampling") if verbose and has_tqdm else timesteps
    for step_index, timestep in enumerate(progress):
        state.step_index, state.timestep = step_index, timestep
        for hook in hooks:
            hook.before_model(state)
        state.model_output = _guided_output(model, state)
        for hook in hooks:
            hook.after_model(state)
        state.sample, state.pred_original_sample = scheduler.step(state.model_output, timestep, state.sample)
        for hook in hooks:
            hook.after_step(state)
    return state.sample
