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

Counterfactuals, Latent Drifting, prompt swapping, DDIM inversion and attention capture differ only in what they do
around a step, so they are written as :class:`SamplingHook`\\ s (or a step function) on this loop rather than as
copies of it (as diffusers' ``callback_on_step_end``). A hook may ask for gradients in its phase (what a
classifier-guidance hook needs) and read a network's extra outputs. Without hooks and guidance the loop is exactly
MONAI's ``DiffusionInferer.sample`` (same model calls, same scheduler steps, same random draws).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import Any, Protocol

import torch
from monai.utils import optional_import

from monai_cfx.networks.schedulers import DDIMInverseScheduler
from monai_cfx.utils import check_finite

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "GuidedStepsHook",
    "KeepSamples",
    "SamplingHook",
    "SamplingState",
    "StepScheduler",
    "check_loop_inputs",
    "denoise",
    "seeded_noise",
]

HOOK_PHASES = ("before_model", "model", "after_model", "after_step")


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


class StepScheduler(Protocol):
    """What the loop needs of a scheduler: MONAI's ``DDIMScheduler`` / ``DDPMScheduler`` after ``set_timesteps``,
    or :class:`~monai_cfx.networks.schedulers.DDIMInverseScheduler` (the loop then inverts)."""

    timesteps: torch.Tensor

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> tuple[torch.Tensor, Any]: ...


@dataclass
class SamplingState:
    """What a hook sees and may change at one step.

    Hooks may replace ``context``, ``uncond_context`` and ``guidance_scale`` in ``before_model`` (a prompt swap at
    step λ, a capture window that runs one branch outside it) and ``sample`` or ``model_output`` in
    ``after_model`` / ``after_step``. ``extra_outputs`` holds what a network returns beyond the noise prediction
    (for example a joint classifier's logits), as the network returned it for the call's batch (with guidance the
    rows are ``[uncond, cond]``). ``step_start`` is the sample the current step started from.
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
    extra_outputs: tuple[torch.Tensor, ...] = ()
    step_start: torch.Tensor | None = None

    @property
    def guided(self) -> bool:
        """Whether this step's network call runs both branches ``[uncond, cond]`` (classifier-free guidance)."""
        return self.uncond_context is not None and self.guidance_scale != 1.0

    def copy(self) -> SamplingState:
        """A shallow copy (tensors shared): a snapshot to continue from with ``denoise(..., start_step=...)``."""
        return replace(self)


class SamplingHook:
    """Base class of step hooks; override only the phases you need. Called in list order.

    The loop runs under ``torch.no_grad()``. A hook that needs gradients in a phase lists it in ``grad_phases``:
    its own ``before_model``, ``after_model`` or ``after_step`` then runs under ``torch.enable_grad()``, and
    ``"model"`` runs the network call itself with gradients (e.g. classifier guidance through the denoiser; make
    ``state.sample`` require grad in ``before_model``). Every other phase keeps ``no_grad``.
    """

    grad_phases: tuple[str, ...] = ()

    def before_model(self, state: SamplingState) -> None:
        """Before the network call: change the conditioning or the guidance scale."""

    def after_model(self, state: SamplingState) -> None:
        """After the (guided) network call, before the scheduler step: change ``state.model_output``."""

    def after_step(self, state: SamplingState) -> None:
        """After the scheduler step: change ``state.sample`` (drift, region blending, ...)."""


class GuidedStepsHook(SamplingHook):
    """Classifier-free guidance on the first ``guided_steps`` steps of a loop only: later steps run the conditional
    branch alone, one network evaluation per image instead of two. The early, noisy steps decide what the image
    becomes; the late ones refine what is there.

    Args:
        guided_steps: number of leading steps that keep the loop's guidance, >= 0.
    """

    def __init__(self, guided_steps: int) -> None:
        if isinstance(guided_steps, bool) or not isinstance(guided_steps, Integral) or guided_steps < 0:
            raise ValueError(f"`guided_steps` must be an int >= 0, got {guided_steps!r}.")
        self.guided_steps = int(guided_steps)

    def before_model(self, state: SamplingState) -> None:
        if state.step_index >= self.guided_steps:
            state.guidance_scale = 1.0


class KeepSamples(SamplingHook):
    """Keep the sample after the listed steps (all steps when ``step_indices`` is None) in :attr:`samples`,
    ``{step_index: sample}``: a trajectory, or the shared prefix that several continuations start from.

    Example::

        keep = KeepSamples([9])
        neutral = denoise(unet, scheduler, noise, context=neutral_text, hooks=[keep])
        # continue from after step 9 with another prompt: equal to swapping the prompt at step 10
        swapped = denoise(unet, scheduler, keep.samples[9], context=target_text, start_step=10)
    """

    def __init__(self, step_indices: Sequence[int] | None = None) -> None:
        self.step_indices = None if step_indices is None else {int(i) for i in step_indices}
        self.samples: dict[int, torch.Tensor] = {}

    def after_step(self, state: SamplingState) -> None:
        if self.step_indices is None or state.step_index in self.step_indices:
            self.samples[state.step_index] = state.sample


def _run_phase(hooks: Sequence[SamplingHook], phase: str, state: SamplingState) -> None:
    for hook in hooks:
        with torch.set_grad_enabled(phase in hook.grad_phases):
            getattr(hook, phase)(state)


def _guided_output(model: torch.nn.Module, state: SamplingState) -> None:
    """Set ``state.model_output`` (and ``extra_outputs``): one network call, with classifier-free guidance
    ``uncond + s * (cond - uncond)`` (Ho & Salimans 2022) on the batch ``[uncond, cond]`` when ``state.guided``."""
    timesteps = torch.Tensor((state.timestep,)).to(state.sample.device)  # as MONAI's DiffusionInferer.sample
    if not state.guided:
        output = model(state.sample, timesteps=timesteps, context=state.context, class_labels=state.class_labels)
    else:
        labels = None if state.class_labels is None else torch.cat([state.class_labels] * 2)
        output = model(
            torch.cat([state.sample] * 2),
            timesteps=timesteps,
            context=torch.cat([state.uncond_context, state.context]),
            class_labels=labels,
        )
    extra: tuple[torch.Tensor, ...] = ()
    if isinstance(output, (tuple, list)):  # a network with extra outputs: the noise prediction comes first
        output, *rest = output
        extra = tuple(rest)
    if state.guided:
        output_uncond, output_cond = output.chunk(2)
        output = output_uncond + state.guidance_scale * (output_cond - output_uncond)
    state.model_output, state.extra_outputs = output, extra


def _evaluate(model: torch.nn.Module, state: SamplingState, hooks: Sequence[SamplingHook], model_grad: bool) -> None:
    with torch.set_grad_enabled(model_grad):
        _guided_output(model, state)
    _run_phase(hooks, "after_model", state)


@torch.no_grad()
def _run_loop(
    model: torch.nn.Module,
    scheduler: StepScheduler,
    sample: torch.Tensor,
    timesteps: Sequence[torch.Tensor],
    *,
    context: torch.Tensor | None = None,
    uncond_context: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    class_labels: torch.Tensor | None = None,
    hooks: Sequence[SamplingHook] = (),
    start_step: int = 0,
    fixed_point_iterations: int = 0,
    progress_description: str | None = None,
) -> torch.Tensor:
    """THE loop, on arguments its caller has checked (conditioning already of the sample's batch size):
    ``timesteps[start_step:]``, one network call and one scheduler step each. :func:`denoise` is its public entry."""
    num_steps = len(timesteps)
    first = timesteps[min(start_step, num_steps - 1)]
    state = SamplingState(start_step, num_steps, first, sample, context, uncond_context, float(guidance_scale))
    state.class_labels = class_labels
    steps = range(start_step, num_steps)
    if progress_description is not None and has_tqdm:
        steps = tqdm(steps, desc=progress_description)
    model_grad = any("model" in hook.grad_phases for hook in hooks)
    for step_index in steps:
        state.step_index, state.timestep = step_index, timesteps[step_index]
        _run_phase(hooks, "before_model", state)
        state.step_start = state.sample
        _evaluate(model, state, hooks, model_grad)
        state.sample, state.pred_original_sample = scheduler.step(state.model_output, state.timestep, state.step_start)
        for _ in range(fixed_point_iterations):
            # evaluate the model where the step landed and re-solve the same step from its start: the fixed point
            # of an implicit step, which removes DDIM inversion's one-level-early approximation
            _evaluate(model, state, hooks, model_grad)
            state.sample, state.pred_original_sample = scheduler.step(
                state.model_output, state.timestep, state.step_start
            )
        _run_phase(hooks, "after_step", state)
    return state.sample


def _batch_of(name: str, value: torch.Tensor | None, batch_size: int, sample_name: str) -> torch.Tensor | None:
    """``value`` with the sample's batch size: one row is expanded, any other mismatch is refused."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a tensor with a batch dimension, got {shape}.")
    if value.shape[0] == batch_size:
        return value
    if value.shape[0] == 1:
        return value.expand(batch_size, *value.shape[1:])
    raise ValueError(
        f"`{name}` must have batch size 1 or {batch_size} (the batch of `{sample_name}`), "
        f"got shape {tuple(value.shape)}."
    )


def check_hooks(hooks: Any, name: str = "hooks") -> list[SamplingHook]:
    """``hooks`` as a list, refused unless it is a sequence of :class:`SamplingHook` (a single hook is refused too,
    naming ``name``): for callers that keep hooks to pass to every loop they run."""
    if isinstance(hooks, (SamplingHook, str, bytes)) or not isinstance(hooks, Sequence):
        raise ValueError(f"`{name}` must be a list of SamplingHook, got {hooks!r}.")
    if not all(isinstance(hook, SamplingHook) for hook in hooks):
        raise ValueError(f"`{name}` must be a list of SamplingHook, got {hooks!r}.")
    return list(hooks)


def check_loop_inputs(
    sample: Any,
    num_timesteps: int,
    context: torch.Tensor | None = None,
    uncond_context: torch.Tensor | None = None,
    guidance_scale: Any = 1.0,
    class_labels: torch.Tensor | None = None,
    start_step: Any = 0,
    fixed_point_iterations: Any = 0,
    sample_name: str = "sample",
) -> dict[str, Any]:
    """Check the loop's inputs once, where they enter (errors name ``sample_name`` for the sample), and return the
    keyword arguments of the loop: conditioning expanded to the sample's batch, the guidance scale as a float."""
    if not isinstance(sample, torch.Tensor) or sample.ndim not in (4, 5) or not sample.is_floating_point():
        described = (
            f"a {sample.dtype} tensor of shape {tuple(sample.shape)}"
            if isinstance(sample, torch.Tensor)
            else type(sample).__name__
        )
        raise ValueError(
            f"`{sample_name}` must be a float tensor (B, C, H, W) or (B, C, H, W, D) (ndim 4 or 5), got {described}."
        )
    check_finite(sample_name, sample)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, Real) or not math.isfinite(guidance_scale):
        raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}.")
    if uncond_context is not None and context is None:
        raise ValueError("`uncond_context` was given without `context`: guidance needs both branches.")
    batch_size = sample.shape[0]
    context = _batch_of("context", context, batch_size, sample_name)
    uncond_context = _batch_of("uncond_context", uncond_context, batch_size, sample_name)
    if uncond_context is not None and uncond_context.shape[1:] != context.shape[1:]:
        raise ValueError(
            f"`uncond_context` must match the shape of `context` {tuple(context.shape)} after the batch dimension, "
            f"got {tuple(uncond_context.shape)}."
        )
    class_labels = _batch_of("class_labels", class_labels, batch_size, sample_name)
    if isinstance(start_step, bool) or not isinstance(start_step, Integral) or not 0 <= start_step <= num_timesteps:
        raise ValueError(
            f"`start_step` must be an int in [0, {num_timesteps}] (the number of timesteps), got {start_step!r}."
        )
    valid = isinstance(fixed_point_iterations, Integral) and not isinstance(fixed_point_iterations, bool)
    if not valid or fixed_point_iterations < 0:
        raise ValueError(f"`fixed_point_iterations` must be an int >= 0, got {fixed_point_iterations!r}.")
    return {
        "context": context,
        "uncond_context": uncond_context,
        "guidance_scale": float(guidance_scale),
        "class_labels": class_labels,
        "start_step": int(start_step),
        "fixed_point_iterations": int(fixed_point_iterations),
    }


def denoise(
    model: torch.nn.Module,
    scheduler: StepScheduler,
    sample: torch.Tensor,
    timesteps: Sequence[torch.Tensor] | torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    uncond_context: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    class_labels: torch.Tensor | None = None,
    hooks: Sequence[SamplingHook] = (),
    verbose: bool = True,
    start_step: int = 0,
    fixed_point_iterations: int = 0,
    progress_description: str = "sampling",
) -> torch.Tensor:
    """Run the steps of ``scheduler`` from ``sample`` over ``timesteps`` (default: all of ``scheduler.timesteps``).

    With a sampling scheduler (MONAI's ``DDIMScheduler``, ``DDPMScheduler``) this is reverse diffusion; with
    :class:`~monai_cfx.networks.schedulers.DDIMInverseScheduler` it is DDIM inversion (see
    :func:`~monai_cfx.inferers.ddim_invert`). Each step: ``before_model`` hooks, one network call (both branches
    batched under classifier-free guidance), ``after_model`` hooks, the scheduler step, ``after_step`` hooks.

    Args:
        model: denoiser with MONAI ``DiffusionModelUNet``'s contract ``model(x, timesteps, context, class_labels)``;
            it may return a tuple whose first item is the prediction (the rest go to ``state.extra_outputs``).
        scheduler: a MONAI scheduler after ``set_timesteps``, or a ``DDIMInverseScheduler``.
        sample: the starting sample ``(B, C, *spatial)``, 2D or 3D.
        timesteps: the timesteps to run, e.g. a tail of ``scheduler.timesteps`` to start part-way (SDEdit); default
            all of ``scheduler.timesteps``.
        context: cross-attention conditioning ``(B or 1, L, D)``.
        uncond_context: conditioning of the unconditional branch (e.g. the empty prompt); with it and a
            ``guidance_scale`` other than 1 each step runs one batched call on ``[uncond, cond]``.
        guidance_scale: classifier-free guidance weight; 1 is plain conditional sampling, 0 follows the
            unconditional branch (while the conditional one still runs, e.g. for attention hooks).
        class_labels: optional class labels ``(B or 1,)`` for the network.
        hooks: :class:`SamplingHook`\\ s run at every step, in order.
        verbose: show a tqdm progress bar.
        start_step: index into ``timesteps`` of the first step to run, with ``sample`` the sample after the step
            before it (e.g. a :class:`KeepSamples` snapshot): continuations that share a prefix of steps. Step
            indices seen by hooks count from the start of ``timesteps``.
        fixed_point_iterations: with a ``DDIMInverseScheduler`` only: extra network calls per step that re-solve the
            step at the model output of its own result (the implicit step; Pan et al. 2023). 0 is the plain step.
            ``after_model`` hooks run after every one of these calls (``before_model`` once per step).
        progress_description: the progress bar's label.

    Returns:
        the final sample.

    Raises:
        ValueError: for a sample that is not a finite float 4D/5D tensor, a non-finite ``guidance_scale``,
            ``uncond_context`` without ``context``, conditioning of another batch size or shape, no timesteps,
            ``start_step`` outside ``[0, len(timesteps)]``, or ``fixed_point_iterations`` that are negative or
            given to a sampling scheduler.

    Example::

        scheduler.set_timesteps(50)
        latent = denoise(unet, scheduler, torch.randn(4, 3, 16, 16), context=text, uncond_context=empty,
                         guidance_scale=3.0)
    """
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    if len(timesteps) == 0:
        raise ValueError("`timesteps` must hold at least one timestep, got none (e.g. an empty tail of the schedule).")
    if fixed_point_iterations and not isinstance(scheduler, DDIMInverseScheduler):
        raise ValueError(
            f"`fixed_point_iterations` ({fixed_point_iterations!r}) re-solve an implicit step: they are for DDIM "
            f"inversion (a DDIMInverseScheduler), not for sampling with {type(scheduler).__name__}; use 0."
        )
    checked = check_loop_inputs(
        sample,
        len(timesteps),
        context,
        uncond_context,
        guidance_scale,
        class_labels,
        start_step,
        fixed_point_iterations,
    )
    progress = progress_description if verbose else None
    return _run_loop(model, scheduler, sample, timesteps, hooks=hooks, progress_description=progress, **checked)
