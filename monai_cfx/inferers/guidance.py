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
"""Classifier guidance as a step hook on the one sampling loop (Dhariwal & Nichol 2021; Mediffusion, Kaleta et al.,
arXiv 2411.09434): steer every reverse step so that a classifier of the predicted clean latent moves towards the
wanted findings, turning a finding off (or on) to make a counterfactual."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F

from .sampling import SamplingHook, SamplingState

__all__ = ["ClassifierGuidanceHook", "ClipOriginalSampleHook", "epsilon_and_original_sample"]

PREDICTION_TYPES = ("epsilon", "v_prediction")


def epsilon_and_original_sample(
    sample: torch.Tensor, model_output: torch.Tensor, alpha_prod_t: torch.Tensor | float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and the clean sample ``(ε̂, x̂₀)`` that a prediction implies at ``x_t = sample``, with
    ``x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε`` (the formulas of MONAI's DDIM/DDPM ``step``):

    * ``epsilon``: ``ε̂ = output``, ``x̂₀ = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t``;
    * ``v_prediction`` (``v = √ᾱ_t ε - √(1-ᾱ_t) x₀``): ``x̂₀ = √ᾱ_t x_t - √(1-ᾱ_t) v``,
      ``ε̂ = √ᾱ_t v + √(1-ᾱ_t) x_t``.
    """
    alpha = torch.as_tensor(alpha_prod_t, dtype=sample.dtype, device=sample.device)
    sqrt_alpha, sqrt_one_minus_alpha = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == "epsilon":
        return model_output, (sample - sqrt_one_minus_alpha * model_output) / sqrt_alpha
    if prediction_type == "v_prediction":
        return (
            sqrt_alpha * model_output + sqrt_one_minus_alpha * sample,
            sqrt_alpha * sample - sqrt_one_minus_alpha * model_output,
        )
    raise ValueError(f"`prediction_type` must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")


def _schedule_of(scheduler: Any, purpose: str) -> tuple[torch.Tensor, str]:
    """A sampling scheduler's ``alphas_cumprod`` and ``prediction_type``, checked for ``purpose`` (the error says what
    needs them)."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(alphas_cumprod, torch.Tensor):
        raise ValueError(
            f"`scheduler` must have `alphas_cumprod` (a MONAI DDIMScheduler or DDPMScheduler), "
            f"got {type(scheduler).__name__}."
        )
    prediction_type = str(getattr(scheduler, "prediction_type", None))
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"`scheduler.prediction_type` must be one of {list(PREDICTION_TYPES)} {purpose}, got {prediction_type!r}."
        )
    return alphas_cumprod, prediction_type


class ClassifierGuidanceHook(SamplingHook):
    """Classifier guidance on the predicted clean latent x̂₀, as an ``after_model`` step hook.

    At each step (timestep ``t``, ``ᾱ = ᾱ_t``) the hook takes x̂₀ from ``state.sample`` and ``state.model_output``
    (:func:`epsilon_and_original_sample`), evaluates ``classifier(x̂₀)``, and takes the loss

        ``L = Σ_{rows, findings kept} BCE(logit, target)``

    (a sum, so that each image's step does not depend on the batch). Classifier guidance (Dhariwal & Nichol 2021,
    Eq. 14) follows ``∇ log p(x_t | y) = ∇ log p(x_t) + ∇ log p(y | x_t)`` with the score
    ``∇ log p(x_t) = -ε / √(1-ᾱ)``; with ``-log p(y | x_t) ≈ s · L(x̂₀(x_t))`` the guided noise is

        ``ε̂ = ε + s · √(1-ᾱ) · ∇_{x_t} L``,

    which is the reference's update (``model_out = pred_noise + sample_grad_scale * sqrt(1 - ᾱ_t) * grad``). In terms
    of the clean sample it is one gradient step on x̂₀: ``x̂₀' = x̂₀ - s · (1-ᾱ)/√ᾱ · ∇_{x_t} L``.

    **Which gradient.** ``∇_{x_t} L = (∂x̂₀/∂x_t)ᵀ ∇_{x̂₀} L`` with ``∂x̂₀/∂x_t = (I - √(1-ᾱ) ∂ε/∂x_t) / √ᾱ``.

    * Default (``through_denoiser=False``): the gradient of L w.r.t. x̂₀ through the classifier only, the denoiser's
      noise prediction held constant: ``∇_{x_t} L ≈ ∇_{x̂₀} L / √ᾱ``. One classifier forward and backward per step,
      no graph through the UNet, and exact when the denoiser's Jacobian term is small (late steps, small ``1-ᾱ``).
      The approximation is made in ε-space (the score), so a ``v_prediction`` network that predicts the same
      ε̂ gets the same guided ε̂ (holding ``v`` instead of ε constant would give ``∂x̂₀/∂x_t = √ᾱ``, a different
      and parameterisation-dependent step).
    * ``through_denoiser=True`` (the reference's choice): the exact gradient, back-propagated through the denoiser's
      call as well (``grad_phases`` then include ``"model"``). It also accounts for how the noise prediction moves
      with x_t, at the price of a backward pass through the UNet and its activations kept in memory every step
      (about three times the cost of a step; under classifier-free guidance through both branches). It is the
      same function of x_t for both parameterisations, so it too gives the same guided ε̂.

    For ``v_prediction`` the guided ε̂ is converted back with the same ᾱ: ``v̂ = v + (ε̂ - ε) / √ᾱ`` (from
    ``ε = √ᾱ v + √(1-ᾱ) x_t``), so the scheduler's step sees exactly the guided ε̂ and x̂₀'.

    Targets: ``target`` ``(B or 1, C)`` holds 0 (remove the finding), 1 (induce it), values in between (soft), or
    NaN (leave it: it is out of the loss and gives no gradient); ``target_mask`` (same shape, bool, True = guide)
    is another way to leave findings. ``findings`` selects the classifier outputs the ``C`` target columns refer to
    (default: all of them). Shapes are checked at construction and, against the classifier's logits and the batch,
    at the first step.

    The classifier is called as given: put networks with dropout or batch norm in ``eval()`` mode.

    Args:
        classifier: ``classifier(latent) -> logits (B, K)`` on latents, differentiable, e.g.
            ``lambda z: joint_unet.classify(z)`` (see :meth:`from_joint`).
        scheduler: the sampling scheduler (MONAI ``DDIMScheduler`` / ``DDPMScheduler``): its ``alphas_cumprod`` and
            ``prediction_type`` (``epsilon`` or ``v_prediction``).
        target: wanted classifier outputs ``(B or 1, C)``: 0, 1 or NaN.
        guidance_scale: ``s`` above, finite and >= 0; 0 leaves the sampling exactly unguided. Negative scales are
            refused: to push a finding away, give it target 0. The reference used 100 (``sample_grad_scale``) on its
            latents; the right scale depends on the latent scale and the classifier's logit range.
        target_mask: optional bool ``(B or 1, C)``; False leaves a finding, as NaN in ``target`` does.
        findings: optional indices of the classifier outputs that the target's columns refer to.
        through_denoiser: take the exact gradient through the denoiser (see above).

    Raises:
        ValueError: for a scheduler without ``alphas_cumprod`` or with another ``prediction_type``, a ``target``
            that is not a 2D float tensor (or whose columns do not match ``findings`` / the logits, or whose batch
            does not match the sample's), a ``target_mask`` of another shape, a ``guidance_scale`` that is not a
            finite number >= 0, or logits that are not ``(B, K)``.

    Example::

        scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
        # remove finding 3 (effusion), keep the others as they are
        target = torch.full((1, 14), float("nan"))
        target[:, 3] = 0.0
        guidance = ClassifierGuidanceHook.from_joint(joint_unet.eval(), scheduler, target, guidance_scale=100.0)
        counterfactual = CounterfactualInferer(scheduler, scale_factor=0.18, start="inversion", guidance_scale=1.0)(
            images, joint_unet, autoencoder, hooks=[guidance]
        )
    """

    def __init__(
        self,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        scheduler: Any,
        target: torch.Tensor,
        guidance_scale: float = 100.0,
        target_mask: torch.Tensor | None = None,
        findings: Sequence[int] | None = None,
        through_denoiser: bool = False,
    ) -> None:
        if not callable(classifier):
            raise ValueError(f"`classifier` must be callable (latent -> logits), got {type(classifier).__name__}.")
        self.classifier = classifier
        self.alphas_cumprod, self.prediction_type = _schedule_of(scheduler, "for classifier guidance")
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, Real)
            or not math.isfinite(guidance_scale)
        ):
            raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {guidance_scale!r}.")
        if guidance_scale < 0:
            raise ValueError(
                f"`guidance_scale` must be >= 0, got {guidance_scale!r}: to push a finding away give it target 0."
            )
        self.guidance_scale = float(guidance_scale)
        self.findings = None if findings is None else [int(i) for i in findings]
        self.target, self.mask = self._check_target(target, target_mask, self.findings)
        self.through_denoiser = bool(through_denoiser)
        # the exact gradient needs x_t to require grad before the network call, and the call itself on the graph
        self.grad_phases = ("before_model", "model", "after_model") if self.through_denoiser else ("after_model",)
        self._checked_logits = False

    @staticmethod
    def _check_target(target: Any, target_mask: Any, findings: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The target with NaN replaced by 0, and the float mask of the guided findings (finite and not masked)."""
        if not isinstance(target, torch.Tensor) or target.ndim != 2 or not target.is_floating_point():
            described = (
                f"a {target.dtype} tensor of shape {tuple(target.shape)}"
                if isinstance(target, torch.Tensor)
                else type(target).__name__
            )
            raise ValueError(f"`target` must be a float tensor (B or 1, C) of 0, 1 or NaN, got {described}.")
        if findings is not None and target.shape[1] != len(findings):
            raise ValueError(
                f"`target` must have one column per entry of `findings` ({len(findings)}), "
                f"got shape {tuple(target.shape)}."
            )
        if bool(torch.isinf(target).any()):
            raise ValueError("`target` must hold 0, 1 or NaN, got infinite values.")
        kept = torch.isfinite(target)
        if bool(((target[kept] < 0) | (target[kept] > 1)).any()):
            raise ValueError("`target` must hold values in [0, 1] (0 remove, 1 induce) or NaN (leave).")
        if target_mask is not None:
            if not isinstance(target_mask, torch.Tensor) or target_mask.shape != target.shape:
                shape = tuple(target_mask.shape) if isinstance(target_mask, torch.Tensor) else type(target_mask)
                raise ValueError(f"`target_mask` must have the shape of `target` {tuple(target.shape)}, got {shape}.")
            kept = kept & target_mask.to(torch.bool)
        return torch.where(kept, target, torch.zeros_like(target)), kept.to(target.dtype)

    @classmethod
    def from_joint(
        cls,
        network: torch.nn.Module,
        scheduler: Any,
        target: torch.Tensor,
        classifier_context: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Guidance by the classifier of a joint diffusion/classifier network (``network.classify`` at ``t = 0``,
        e.g. :class:`~monai_cfx.networks.nets.JointDiffusionUNet`). Other arguments as the constructor.

        Args:
            classifier_context: the context the head was trained with, ``(1, L, D)`` (for a cross-attention UNet
                :class:`~monai_cfx.engines.JointDiffusionPrepareBatch` uses the empty prompt's, never the report),
                expanded to each batch; None for a network without conditioning.

        Raises:
            ValueError: "guidance on a network without a classifier" for a network without ``classify``.
        """
        if not callable(getattr(network, "classify", None)):
            raise ValueError(
                f"guidance on a network without a classifier: `network` ({type(network).__name__}) has no "
                "`classify` method; expected a JointDiffusionUNet (or pass a `classifier` callable)."
            )
        if classifier_context is None:
            return cls(network.classify, scheduler, target, **kwargs)

        def classify(latent: torch.Tensor) -> torch.Tensor:
            context = classifier_context.to(latent).expand(latent.shape[0], *classifier_context.shape[1:])
            return network.classify(latent, context=context)

        return cls(classify, scheduler, target, **kwargs)

    def _loss(self, original_sample: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(original_sample)
        batch_size = original_sample.shape[0]
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != batch_size:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"`classifier` must return logits (B, K) = ({batch_size}, K), got {shape}.")
        if not self._checked_logits:
            self._check_against(logits, batch_size)
        if self.findings is not None:
            logits = logits[:, self.findings]
        target = self.target.to(logits)
        mask = self.mask.to(logits)
        terms = F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none")
        return (terms * mask).sum()

    def _check_against(self, logits: torch.Tensor, batch_size: int) -> None:
        num_logits = logits.shape[1]
        if self.findings is None and self.target.shape[1] != num_logits:
            raise ValueError(
                f"`target` must have one column per classifier output ({num_logits}), got shape "
                f"{tuple(self.target.shape)}; give `findings` to guide a subset."
            )
        if self.findings is not None and not all(-num_logits <= i < num_logits for i in self.findings):
            raise ValueError(f"`findings` must index the classifier's {num_logits} outputs, got {self.findings}.")
        if self.target.shape[0] not in (1, batch_size):
            raise ValueError(
                f"`target` must have batch size 1 or {batch_size} (the batch of the sample), "
                f"got shape {tuple(self.target.shape)}."
            )
        self._checked_logits = True

    def before_model(self, state: SamplingState) -> None:
        if self.through_denoiser and self.guidance_scale != 0:
            state.sample = state.sample.detach().requires_grad_(True)

    def after_model(self, state: SamplingState) -> None:
        if self.guidance_scale == 0:
            return  # exactly the unguided step
        alpha = self.alphas_cumprod[int(state.timestep)].to(device=state.sample.device, dtype=state.sample.dtype)
        sample, model_output = state.sample, state.model_output
        if self.through_denoiser:
            if not sample.requires_grad or not model_output.requires_grad:
                raise RuntimeError(
                    "`through_denoiser=True` needs the network call on the autograd graph of the sample: run the "
                    "hook on the sampling loop (not with fixed-point iterations) and do not detach the sample "
                    "between this hook's `before_model` and the network call."
                )
            _, original = epsilon_and_original_sample(sample, model_output, alpha, self.prediction_type)
            gradient = torch.autograd.grad(self._loss(original), sample)[0]
        else:
            _, original = epsilon_and_original_sample(
                sample.detach(), model_output.detach(), alpha, self.prediction_type
            )
            original = original.requires_grad_(True)
            # the noise prediction held constant: dx̂₀/dx_t = 1 / √ᾱ
            gradient = torch.autograd.grad(self._loss(original), original)[0] / alpha.sqrt()
        epsilon_shift = self.guidance_scale * (1 - alpha).sqrt() * gradient
        if self.prediction_type == "v_prediction":
            epsilon_shift = epsilon_shift / alpha.sqrt()  # v̂ = v + (ε̂ - ε) / √ᾱ
        state.model_output = (model_output + epsilon_shift).detach()
        state.sample = sample.detach()


class ClipOriginalSampleHook(SamplingHook):
    """Keep the predicted clean latent x̂₀ within the training latents' range, as an ``after_model`` step hook (static
    thresholding, cf. Saharia et al. 2022, Imagen, sec. 2.3; MONAI's ``clip_sample`` clips x̂₀ only to [-1, 1] and
    keeps the unclipped noise for the step's direction).

    At each step x̂₀ is taken from ``state.sample`` and ``state.model_output`` (:func:`epsilon_and_original_sample`),
    clipped per channel to ``[low, high]``, and the model output is re-derived from the clipped x̂₀ (ε̂ = (x_t - √ᾱ
    x̂₀) / √(1-ᾱ); v̂ = √ᾱ ε̂ - √(1-ᾱ) x̂₀), so that the scheduler's step stays consistent. Where x̂₀ is in range nothing
    changes.

    Why: near pure noise (ᾱ_T ≈ 1e-4 for the bundles' scaled-linear schedule) an ε-prediction error δ becomes an
    x̂₀ error δ / √ᾱ_T, about 100 δ; deterministic DDIM carries it along the trajectory and samples drift off the
    latent distribution (textures without anatomy). Clipping bounds that error at each step.

    Args:
        scheduler: the sampling scheduler (MONAI ``DDIMScheduler`` / ``DDPMScheduler``): its ``alphas_cumprod`` and
            ``prediction_type`` (``epsilon`` or ``v_prediction``).
        low: lower bound of x̂₀, one value per latent channel or one for all (scaled latents, as the UNet sees them).
        high: upper bound, likewise; ``high > low`` everywhere.

    Raises:
        ValueError: for a scheduler without ``alphas_cumprod`` or with another ``prediction_type``, bounds that are
            not finite, not ``low < high``, or (at the first step) not one per channel of the sample.
    """

    def __init__(self, scheduler: Any, low: float | Sequence[float], high: float | Sequence[float]) -> None:
        self.alphas_cumprod, self.prediction_type = _schedule_of(scheduler, "to clip x̂₀")
        low_values = torch.as_tensor(low, dtype=torch.float32).flatten()
        high_values = torch.as_tensor(high, dtype=torch.float32).flatten()
        sizes = (low_values.numel(), high_values.numel())
        if 0 in sizes or (sizes[0] != sizes[1] and 1 not in sizes):
            raise ValueError(f"`low` and `high` must hold one value each or one per channel, got {low!r} and {high!r}.")
        if not (torch.isfinite(low_values).all() and torch.isfinite(high_values).all()):
            raise ValueError(f"`low` and `high` must be finite, got {low!r} and {high!r}.")
        if not (low_values < high_values).all():
            raise ValueError(f"`low` must be below `high` in every channel, got {low!r} and {high!r}.")
        self.low, self.high = low_values, high_values

    def after_model(self, state: SamplingState) -> None:
        sample, model_output = state.sample, state.model_output
        channels = sample.shape[1]
        if max(self.low.numel(), self.high.numel()) not in (1, channels):
            raise ValueError(
                f"`low` and `high` hold {max(self.low.numel(), self.high.numel())} values, the sample has "
                f"{channels} channels."
            )
        shape = (1, -1) + (1,) * (sample.ndim - 2)
        low = self.low.to(device=sample.device, dtype=sample.dtype).view(shape)
        high = self.high.to(device=sample.device, dtype=sample.dtype).view(shape)
        alpha = self.alphas_cumprod[int(state.timestep)].to(device=sample.device, dtype=sample.dtype)
        _, original = epsilon_and_original_sample(sample, model_output, alpha, self.prediction_type)
        clipped = torch.maximum(torch.minimum(original, high), low)
        epsilon = (sample - alpha.sqrt() * clipped) / (1 - alpha).sqrt()
        if self.prediction_type == "v_prediction":
            state.model_output = alpha.sqrt() * epsilon - (1 - alpha).sqrt() * clipped
        else:
            state.model_output = epsilon
