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
"""Language-guided trajectory traversal (TehraniNasab, Kumar and Arbel, arXiv 2503.23623; reference code
tehraninasab/sd-latent-traversal).

DDIM sampling from a fixed ``z_T`` runs under a *neutral* prompt until step index λ and under a *target* prompt
from there on: the later the swap, the less of the target attribute the image gets. A sweep over λ gives a
trajectory of final latents ``[z_neutral, z(λ_max), ..., z(λ_min)]`` from the neutral image towards the target,
which a Bézier curve through those control points (Bernstein form) turns into a smooth sequence of frames.

Beyond the paper, the trajectory can start from a real scan: ``z_T`` is the DDIM inversion of its latent under the
neutral prompt, so the neutral end of the trajectory reconstructs the scan ("this patient's radiograph,
progressively with an effusion").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb
from numbers import Integral, Real

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler

from monai_cfx.networks.schedulers import (
    TIMESTEP_SPACINGS,
    DDIMInverseScheduler,
    check_num_inference_steps,
    set_timestep_spacing,
)
from monai_cfx.networks.utils import downsampling_factor, encode_mean, spatial_dims_of
from monai_cfx.utils import check_finite, check_option

from .sampling import KeepSamples, SamplingHook, SamplingState, _run_loop, check_hooks, check_loop_inputs

__all__ = [
    "PromptSwapHook",
    "TrajectoryTraversalInferer",
    "TraversalResult",
    "bezier_curve",
    "linear_path",
]

START_MODES = ("noise", "image")
# the reference's swap steps: every 5th of 50 DDIM steps, from 5 to 45
DEFAULT_SWAP_STEPS = (5, 10, 15, 20, 25, 30, 35, 40, 45)


class PromptSwapHook(SamplingHook):
    """Swap the conditioning at step index ``swap_step``: from that step on the network sees ``context``
    (and ``uncond_context`` in the unconditional branch, if given; otherwise that branch stays as it is, e.g. the
    empty prompt, as in the paper).

    Args:
        swap_step: the first step index (0-based, counted from the start of the schedule) run with ``context``.
        context: the target prompt's context ``(B or 1, L, D)``.
        uncond_context: an optional new unconditional context from the same step, ``(B or 1, L, D)``.

    Example::

        swap = PromptSwapHook(10, target_text)
        latent = denoise(unet, scheduler, noise, context=neutral_text, uncond_context=empty, guidance_scale=7.5,
                         hooks=[swap])
    """

    def __init__(self, swap_step: int, context: torch.Tensor, uncond_context: torch.Tensor | None = None) -> None:
        if isinstance(swap_step, bool) or not isinstance(swap_step, Integral) or swap_step < 0:
            raise ValueError(f"`swap_step` must be an int >= 0, got {swap_step!r}.")
        self.swap_step = int(swap_step)
        self.context, self.uncond_context = context, uncond_context

    def before_model(self, state: SamplingState) -> None:
        if state.step_index >= self.swap_step:
            batch_size = state.sample.shape[0]
            # one prompt for the batch broadcasts, as the loop's own conditioning does
            state.context = self.context.expand(batch_size, *self.context.shape[1:])
            if self.uncond_context is not None:
                state.uncond_context = self.uncond_context.expand(batch_size, *self.uncond_context.shape[1:])


def _check_control_points(control_points: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    points = torch.stack(list(control_points)) if not isinstance(control_points, torch.Tensor) else control_points
    if points.ndim < 1 or points.shape[0] < 2:
        raise ValueError(
            "`control_points` must hold at least two control points (stacked on dim 0), "
            f"got {points.shape[0] if points.ndim else 0}."
        )
    return points


def _check_num_frames(num_frames: object) -> int:
    if isinstance(num_frames, bool) or not isinstance(num_frames, Integral) or num_frames < 2:
        raise ValueError(f"`num_frames` must be an int >= 2, got {num_frames!r}.")
    return int(num_frames)


def bezier_curve(control_points: torch.Tensor | Sequence[torch.Tensor], num_frames: int) -> torch.Tensor:
    """Frames along the Bézier curve through ``control_points`` (Bernstein form, accumulated in float64):
    ``B(s) = sum_i C(n, i) (1 - s)^(n - i) s^i P_i`` at ``s = 0, 1 / (F - 1), ..., 1``.

    The curve starts at the first control point and ends at the last; the others pull it without being reached.

    Args:
        control_points: ``(n + 1, *shape)`` (or a sequence of tensors of one shape), ``n + 1 >= 2``.
        num_frames: ``F >= 2`` frames, both end points included.

    Returns:
        ``(F, *shape)`` in the control points' dtype.

    Example::

        points = torch.stack([z_neutral, z_45, z_25, z_5])  # (4, B, C, H, W)
        frames = bezier_curve(points, 50)  # (50, B, C, H, W), frames[0] == z_neutral, frames[-1] == z_5
    """
    points = _check_control_points(control_points)
    num_frames = _check_num_frames(num_frames)
    degree = points.shape[0] - 1
    s = torch.linspace(0.0, 1.0, num_frames, dtype=torch.float64, device=points.device)
    index = torch.arange(degree + 1, dtype=torch.float64, device=points.device)
    binomial = torch.tensor([comb(degree, i) for i in range(degree + 1)], dtype=torch.float64, device=points.device)
    # (F, n + 1) Bernstein weights; 0 ** 0 == 1 keeps the end points exact
    weights = binomial * (1 - s)[:, None] ** (degree - index) * s[:, None] ** index
    frames = weights @ points.reshape(degree + 1, -1).double()
    return frames.reshape(num_frames, *points.shape[1:]).to(points.dtype)


def linear_path(start: torch.Tensor, end: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``F`` frames on the straight line from ``start`` to ``end`` (the baseline a Bézier trajectory is compared
    with): the Bézier curve of the two end points."""
    return bezier_curve(torch.stack([start, end]), num_frames)


@dataclass
class TraversalResult:
    """What one traversal gives, for a batch of ``B`` trajectories.

    Attributes:
        swap_steps: the λ of each swap latent, from the latest swap (closest to neutral) to the earliest.
        neutral_latent: ``z_neutral`` ``(B, C, *latent)``: the neutral prompt throughout.
        swap_latents: ``(Λ, B, C, *latent)``: the final latent of each swap, in ``swap_steps`` order.
        frame_latents: ``(F, B, C, *latent)``: the Bézier frames through ``[z_neutral, *swap_latents]``.
        initial_latent: the shared ``z_T`` ``(B, C, *latent)``.
        num_model_calls: network calls the sweep made (each on the guided batch).
    """

    swap_steps: list[int]
    neutral_latent: torch.Tensor
    swap_latents: torch.Tensor
    frame_latents: torch.Tensor
    initial_latent: torch.Tensor
    num_model_calls: int

    def control_points(self) -> torch.Tensor:
        """``(Λ + 1, B, C, *latent)``: ``[z_neutral, *swap_latents]``."""
        return torch.cat([self.neutral_latent[None], self.swap_latents])


class _CountCalls(SamplingHook):
    def __init__(self) -> None:
        self.calls = 0

    def after_model(self, state: SamplingState) -> None:
        self.calls += 1


class TrajectoryTraversalInferer(Inferer):
    """Traverse a text-conditioned latent diffusion model's latent space from a neutral prompt to a target prompt
    (arXiv 2503.23623): a λ sweep of prompt swaps from one ``z_T``, and a Bézier curve through its final latents.

    The sweep shares what is shared: one neutral trajectory is computed, and each λ continues from the neutral
    sample saved after step ``λ - 1`` (:class:`~monai_cfx.inferers.KeepSamples`, ``start_step``). DDIM with
    ``eta = 0`` is deterministic, so this equals running every swap from ``z_T`` separately, bit for bit, at
    ``N + sum(N - λ)`` instead of ``N (Λ + 1)`` network calls (0.55 for the reference's 9 swaps of 50 steps); a
    stochastic scheduler could not share a prefix, so only a ``DDIMScheduler`` is taken.

    ``inferer(inputs, diffusion_model, autoencoder_model, neutral_context, target_context, uncond_context)``: with
    ``start="noise"`` the inputs are the initial latents ``z_T``; with ``start="image"`` they are images, encoded
    (posterior mean, scaled) and DDIM-inverted under the neutral prompt with the same guidance (and
    ``inversion_fixed_point_iterations``), so that the neutral trajectory reconstructs them.

    Args:
        scheduler: a MONAI ``DDIMScheduler``.
        scale_factor: latent scaling of the diffusion model.
        num_inference_steps: DDIM steps ``N`` (the reference: 50).
        guidance_scale: classifier-free guidance weight (the reference: 7.5); 1 runs the conditional branch alone.
        swap_steps: the λ of the sweep, each in ``[0, N)``; sorted from the latest to the earliest swap.
        num_frames: Bézier frames ``F`` (both ends included).
        timestep_spacing: ``"linspace"`` (MONAI's), ``"leading"`` (Stable Diffusion's) or ``"trailing"``.
        start: ``"noise"`` or ``"image"``.
        inversion_fixed_point_iterations: extra network calls per inversion step for ``start="image"`` (a
            near-exact round trip; see :func:`~monai_cfx.inferers.ddim_invert`).
        hooks: step hooks of every sampling run of the sweep (the neutral trajectory and each swap), for example a
            :class:`~monai_cfx.inferers.ClipOriginalSampleHook`; not of the inversion. They must be deterministic
            functions of the step's state, so that the swaps may still share the neutral prefix.
        verbose: progress bars.

    Raises:
        ValueError: for a scheduler other than DDIM, an empty or duplicate λ list, a λ outside ``[0, N)``, a
            non-finite guidance scale, fewer than 2 frames, or trailing spacing with ``N`` that does not divide the
            training steps.

    Example::

        inferer = TrajectoryTraversalInferer(DDIMScheduler(), scale_factor=1.2, guidance_scale=7.5)
        result = inferer(seeded_noise(latent_shape, seeds), unet, autoencoder, neutral, target, empty)
        frames = inferer.decode(result.frame_latents, autoencoder)  # (F, B, C, H, W)
    """

    def __init__(
        self,
        scheduler: DDIMScheduler,
        scale_factor: float = 1.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        swap_steps: Sequence[int] = DEFAULT_SWAP_STEPS,
        num_frames: int = 50,
        timestep_spacing: str = "linspace",
        start: str = "noise",
        inversion_fixed_point_iterations: int = 0,
        hooks: Sequence[SamplingHook] = (),
        verbose: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(scheduler, DDIMScheduler):
            raise ValueError(
                "`scheduler` must be a MONAI DDIMScheduler: the sweep shares one neutral trajectory, which is exact "
                f"only for deterministic DDIM sampling; got {type(scheduler).__name__}."
            )
        num_inference_steps = check_num_inference_steps(scheduler, num_inference_steps)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, Real):
            raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}.")
        check_finite("guidance_scale", torch.tensor(float(guidance_scale)))
        self.scheduler = scheduler
        self.scale_factor = float(scale_factor)
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.swap_steps = self._check_swap_steps(swap_steps)
        self.num_frames = _check_num_frames(num_frames)
        self.timestep_spacing = check_option("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        set_timestep_spacing(scheduler, self.num_inference_steps, timestep_spacing)  # refuses what cannot be spaced
        self.start = check_option("start", start, START_MODES)
        valid = isinstance(inversion_fixed_point_iterations, Integral) and not isinstance(
            inversion_fixed_point_iterations, bool
        )
        if not valid or inversion_fixed_point_iterations < 0:
            raise ValueError(
                f"`inversion_fixed_point_iterations` must be an int >= 0, got {inversion_fixed_point_iterations!r}."
            )
        self.inversion_fixed_point_iterations = int(inversion_fixed_point_iterations)
        self.hooks = check_hooks(hooks)
        self.verbose = verbose

    def _check_swap_steps(self, swap_steps: Sequence[int]) -> list[int]:
        if isinstance(swap_steps, (str, bytes)) or not isinstance(swap_steps, Sequence) or len(swap_steps) == 0:
            raise ValueError(f"`swap_steps` must be a non-empty list of step indices, got {swap_steps!r}.")
        steps = []
        for step in swap_steps:
            if isinstance(step, bool) or not isinstance(step, Integral):
                raise ValueError(f"`swap_steps` must hold ints, got {step!r} in {list(swap_steps)}.")
            if not 0 <= step < self.num_inference_steps:
                raise ValueError(
                    f"`swap_steps` must lie in [0, {self.num_inference_steps}) (the DDIM steps), got {step} in "
                    f"{list(swap_steps)}."
                )
            steps.append(int(step))
        duplicates = sorted({step for step in steps if steps.count(step) > 1})
        if duplicates:
            raise ValueError(f"`swap_steps` must not repeat a step, got {duplicates} more than once in {steps}.")
        return sorted(steps, reverse=True)  # the trajectory's order: latest swap (closest to neutral) first

    def _timesteps(self) -> torch.Tensor:
        return set_timestep_spacing(self.scheduler, self.num_inference_steps, self.timestep_spacing)

    def _progress(self, description: str) -> str | None:
        return description if self.verbose else None

    @torch.no_grad()
    def invert(
        self,
        latent: torch.Tensor,
        diffusion_model: torch.nn.Module,
        neutral_context: torch.Tensor,
        uncond_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DDIM inversion of ``latent`` to ``z_T`` under the neutral prompt with the sweep's guidance, so that the
        neutral trajectory samples it back."""
        inverse = DDIMInverseScheduler(self.scheduler)
        timesteps = inverse.set_timesteps(self.num_inference_steps, self.timestep_spacing)
        guided = uncond_context is not None and self.guidance_scale != 1.0
        return _run_loop(
            diffusion_model,
            inverse,
            latent,
            timesteps,
            context=neutral_context,
            uncond_context=uncond_context if guided else None,
            guidance_scale=self.guidance_scale,
            fixed_point_iterations=self.inversion_fixed_point_iterations,
            progress_description=self._progress("DDIM inversion"),
        )

    def sweep(
        self,
        initial_latent: torch.Tensor,
        diffusion_model: torch.nn.Module,
        neutral_context: torch.Tensor,
        target_context: torch.Tensor,
        uncond_context: torch.Tensor | None = None,
    ) -> TraversalResult:
        """The λ sweep from ``initial_latent`` with one shared neutral trajectory, and the Bézier frames.

        Args:
            initial_latent: ``z_T`` ``(B, C, *latent)``.
            diffusion_model: the denoiser.
            neutral_context, target_context: the two prompts' contexts ``(B or 1, L, D)``.
            uncond_context: the unconditional branch's context (the empty prompt), kept through the swap.

        Raises:
            ValueError: for a latent that is not a finite float 4D/5D tensor, or contexts of another batch or shape.
        """
        checked = check_loop_inputs(
            initial_latent, self.num_inference_steps, neutral_context, uncond_context, sample_name="initial_latent"
        )
        neutral, batch_size = checked["context"], initial_latent.shape[0]
        shape_ok = isinstance(target_context, torch.Tensor) and target_context.shape[1:] == neutral.shape[1:]
        if not shape_ok or target_context.shape[0] not in (1, batch_size):
            shape = tuple(target_context.shape) if isinstance(target_context, torch.Tensor) else target_context
            raise ValueError(
                f"`target_context` must be a (1 or {batch_size}, {', '.join(map(str, neutral.shape[1:]))}) tensor "
                f"like `neutral_context`, got {shape}."
            )
        target = target_context.expand(batch_size, *target_context.shape[1:])
        return self._sweep(initial_latent, diffusion_model, neutral, target, checked["uncond_context"])

    @torch.no_grad()
    def _sweep(
        self,
        initial_latent: torch.Tensor,
        diffusion_model: torch.nn.Module,
        neutral_context: torch.Tensor,
        target_context: torch.Tensor,
        uncond_context: torch.Tensor | None,
    ) -> TraversalResult:
        timesteps = self._timesteps()
        guided = uncond_context is not None and self.guidance_scale != 1.0
        branches = {"uncond_context": uncond_context if guided else None, "guidance_scale": self.guidance_scale}
        counter = _CountCalls()
        kept = KeepSamples([step - 1 for step in self.swap_steps if step > 0])
        neutral = _run_loop(
            diffusion_model,
            self.scheduler,
            initial_latent,
            timesteps,
            context=neutral_context,
            hooks=[*self.hooks, kept, counter],
            progress_description=self._progress("neutral trajectory"),
            **branches,
        )
        swaps = []
        for step in self.swap_steps:
            # the neutral prompt's first `step` steps are shared: continue from the sample they reached
            shared = initial_latent if step == 0 else kept.samples[step - 1]
            swaps.append(
                _run_loop(
                    diffusion_model,
                    self.scheduler,
                    shared,
                    timesteps,
                    context=target_context,
                    hooks=[*self.hooks, counter],
                    start_step=step,
                    progress_description=self._progress(f"swap at step {step}"),
                    **branches,
                )
            )
        swap_latents = torch.stack(swaps)
        frames = bezier_curve(torch.cat([neutral[None], swap_latents]), self.num_frames)
        return TraversalResult(list(self.swap_steps), neutral, swap_latents, frames, initial_latent, counter.calls)

    def decode(self, latents: torch.Tensor, autoencoder_model: torch.nn.Module, batch_size: int = 16) -> torch.Tensor:
        """Decode ``(K, B, C, *latent)`` latents (frames, swaps) to images ``(K, B, C_image, *spatial)``."""
        flat = latents.reshape(-1, *latents.shape[2:])
        with torch.no_grad():
            images = [
                autoencoder_model.decode_stage_2_outputs(flat[i : i + batch_size] / self.scale_factor)
                for i in range(0, len(flat), batch_size)
            ]
        decoded = torch.cat(images)
        return decoded.reshape(*latents.shape[:2], *decoded.shape[1:])

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: torch.nn.Module,
        autoencoder_model: torch.nn.Module,
        neutral_context: torch.Tensor,
        target_context: torch.Tensor,
        uncond_context: torch.Tensor | None = None,
    ) -> TraversalResult:
        """Traverse from ``inputs``: initial latents ``z_T`` (``start="noise"``) or images (``start="image"``).

        Args:
            inputs: ``(B, C, *spatial)``, 2D or 3D.
            diffusion_model: the text-conditioned denoiser (MONAI ``DiffusionModelUNet`` contract).
            autoencoder_model: the autoencoder (encodes images for ``start="image"``).
            neutral_context: the neutral prompt's context ``(B or 1, L, D)``.
            target_context: the target prompt's context, same shape.
            uncond_context: the unconditional context for classifier-free guidance (the empty prompt's).

        Raises:
            ValueError: for inputs that are not a finite float 4D/5D batch, of another dimensionality or channel
                count than the networks, of a size the autoencoder cannot divide, or contexts of another shape.
        """
        if not isinstance(inputs, torch.Tensor) or inputs.ndim not in (4, 5) or not inputs.is_floating_point():
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"`inputs` must be a float (B, C, H, W) or (B, C, H, W, D) tensor, got {shape}.")
        check_finite("inputs", inputs)
        spatial_dims = inputs.ndim - 2
        network_dims = spatial_dims_of(diffusion_model)
        if network_dims is not None and network_dims != spatial_dims:
            raise ValueError(
                f"`inputs` has {spatial_dims} spatial dimensions {tuple(inputs.shape[2:])}, but `diffusion_model` is a "
                f"{network_dims}D network."
            )
        batch_size = inputs.shape[0]
        contexts = {"neutral_context": neutral_context, "target_context": target_context}
        if uncond_context is not None:
            contexts["uncond_context"] = uncond_context
        for name, value in contexts.items():
            if not isinstance(value, torch.Tensor) or value.ndim != 3 or value.shape[0] not in (1, batch_size):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"`{name}` must be a (1 or {batch_size}, L, D) tensor, got {shape}.")
            if value.shape[1:] != neutral_context.shape[1:]:
                raise ValueError(
                    f"`{name}` must have the shape of `neutral_context` {tuple(neutral_context.shape[1:])} after the "
                    f"batch dimension, got {tuple(value.shape)}."
                )
            contexts[name] = value.expand(batch_size, *value.shape[1:])
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        if self.start == "image":
            factor = downsampling_factor(autoencoder_model) * downsampling_factor(diffusion_model)
            if any(size % factor for size in plain.shape[2:]):
                raise ValueError(
                    f"`inputs` of size {tuple(plain.shape[2:])} do not fit the networks: each side must be a multiple "
                    f"of {factor} (bring the scan to the model's size first)."
                )
            with torch.no_grad():
                latent = encode_mean(autoencoder_model, plain) * self.scale_factor
            initial = self.invert(latent, diffusion_model, contexts["neutral_context"], contexts.get("uncond_context"))
        else:
            in_channels = getattr(diffusion_model, "in_channels", None)
            if in_channels is not None and plain.shape[1] != in_channels:
                raise ValueError(
                    f"`inputs` (initial latents) have {plain.shape[1]} channels, but `diffusion_model` takes "
                    f"{in_channels}."
                )
            initial = plain
        return self._sweep(
            initial,
            diffusion_model,
            contexts["neutral_context"],
            contexts["target_context"],
            contexts.get("uncond_context"),
        )
