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
"""Zero-shot phrase grounding from the cross-attention of a text-conditioned latent diffusion model
(Vilouras et al. 2024, arXiv 2404.12920; reference code vios-s/ldm-phrase-grounding)."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler
from monai.transforms import GaussianSmooth

from monai_cfx.networks.schedulers import TIMESTEP_SPACINGS, DDIMInverseScheduler
from monai_cfx.networks.utils import encode_mean
from monai_cfx.transforms import OtsuThreshold
from monai_cfx.utils import check_finite, check_option
from monai_cfx.visualize import CrossAttentionRecorder

from .sampling import SamplingHook, SamplingState, _run_loop

__all__ = ["CaptureWindowHook", "CrossAttentionGroundingInferer"]

DRIVES = ("uncond", "cond")


def _with_meta_of(inputs: MetaTensor, result: torch.Tensor) -> MetaTensor:
    """``result`` as a MetaTensor carrying the input batch's meta data (affine, file names)."""
    output = MetaTensor(result)
    output.copy_meta_from(inputs, copy_attr=True)
    return output


class CaptureWindowHook(SamplingHook):
    """The step hook of a grounding's inversion: which branch each step runs, and when the recorder records.

    With ``drive="uncond"`` (the reference's) the empty prompt drives the inversion: outside the capture window
    only that branch runs; inside it the batch ``[uncond, cond]`` runs with guidance weight 0 (the unconditional
    output drives, the prompt's rows are recorded). With ``drive="cond"`` the prompt drives and is recorded, and
    only its branch ever runs. The recorder records exactly inside the window.

    Args:
        captured_steps: indices of the steps inside the capture window.
        drive: ``"uncond"`` or ``"cond"``.
        context: the prompt's context, of the sample's batch size.
        uncond_context: the empty prompt's context, same shape.
        recorder: the :class:`~monai_cfx.visualize.CrossAttentionRecorder` to switch, or None.
    """

    def __init__(
        self,
        captured_steps: Sequence[int],
        drive: str,
        context: torch.Tensor,
        uncond_context: torch.Tensor,
        recorder: CrossAttentionRecorder | None = None,
    ) -> None:
        self.captured_steps = set(captured_steps)
        self.drive = check_option("drive", drive, DRIVES)
        self.context, self.uncond_context = context, uncond_context
        self.recorder = recorder

    def before_model(self, state: SamplingState) -> None:
        inside = state.step_index in self.captured_steps
        if self.recorder is not None:
            self.recorder.recording = inside
        if self.drive == "cond":
            state.context, state.uncond_context = self.context, None
        elif inside:
            state.context, state.uncond_context, state.guidance_scale = self.context, self.uncond_context, 0.0
        else:
            state.context, state.uncond_context = self.uncond_context, None


class CrossAttentionGroundingInferer(Inferer):
    """Heat maps of where phrases of a prompt are in an image, read from the cross-attention of the UNet while
    the image's latent is DDIM-inverted.

    The image's latent is DDIM-inverted on the library's one loop. The unconditional branch drives the inversion
    (``drive="uncond"``, as the reference code) and the prompt's branch is recorded by a
    :class:`~monai_cfx.visualize.CrossAttentionRecorder` during ``capture_window`` (a fraction range of the
    inversion, default the middle 20 %) on the selected ``layers``: a :class:`CaptureWindowHook` runs the prompt's
    branch (batched with the driving one) only inside the window, and the inversion stops at the window's end, so
    ``N`` steps with the default window cost ``0.6 N + 0.2 N`` image evaluations instead of the reference's
    ``2 N``. With ``drive="cond"`` the prompt drives and is recorded, and only its branch runs (``0.6 N``). Each
    phrase's heat map is the mean over steps and layers of the min-max normalised attention of its tokens (averaged
    first), resized to the image, smoothed (``sigma`` pixels), min-max normalised and masked by Otsu's threshold.
    The inversion does not depend on the phrases, so any number of phrases of one prompt cost one inversion.

    Args:
        scheduler: a MONAI ``DDIMScheduler``.
        scale_factor: latent scaling of the diffusion model.
        num_inference_steps: DDIM inversion steps (the reference uses 300).
        capture_window: ``(start, end)`` fractions of the inversion steps to record.
        layers: layer selection of the recorder (``"middle"``, ``"all"``, a level, a list of levels, name patterns).
        drive: ``"uncond"`` or ``"cond"``: which branch drives the inversion.
        sigma: Gaussian standard deviation in image pixels; 0 disables it.
        otsu: multiply the heat map by its Otsu mask.
        timestep_spacing: ``"trailing"`` (the reference code's, reaching the last training level), ``"leading"``
            or ``"linspace"`` (MONAI's ``DDIMScheduler``); see
            :func:`~monai_cfx.networks.schedulers.set_timestep_spacing`.
        verbose: show a progress bar.
    """

    def __init__(
        self,
        scheduler: DDIMScheduler,
        scale_factor: float = 1.0,
        num_inference_steps: int = 50,
        capture_window: Sequence[float] = (0.4, 0.6),
        layers: str | int | Sequence[int] | Sequence[str] = "middle",
        drive: str = "uncond",
        sigma: float = 2.5,
        otsu: bool = True,
        timestep_spacing: str = "trailing",
        verbose: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(scheduler, DDIMScheduler):
            raise ValueError(f"`scheduler` must be a MONAI DDIMScheduler, got {type(scheduler).__name__}.")
        window = tuple(float(f) for f in capture_window)
        if len(window) != 2 or not 0.0 <= window[0] < window[1] <= 1.0:
            raise ValueError(
                f"`capture_window` must be (start, end) with 0 <= start < end <= 1, got {capture_window!r}."
            )
        if isinstance(sigma, bool) or not isinstance(sigma, Real) or sigma < 0:
            raise ValueError(f"`sigma` must be a number >= 0, got {sigma!r}.")
        self.scheduler = scheduler
        self.scale_factor = float(scale_factor)
        self.num_inference_steps = num_inference_steps
        self.capture_window = window
        self.layers = layers
        self.drive = check_option("drive", drive, DRIVES)
        self.sigma = float(sigma)
        self.otsu = otsu
        self.timestep_spacing = check_option("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.verbose = verbose

    def captured_steps(self) -> list[int]:
        """Indices of the inversion steps whose attention is recorded (at least one)."""
        start, end = self.capture_window
        first = int(start * self.num_inference_steps)
        last = max(first + 1, round(end * self.num_inference_steps))
        return list(range(first, min(last, self.num_inference_steps)))

    def recorder(
        self, diffusion_model: torch.nn.Module, token_indices: Sequence[Sequence[int]], batch_size: int
    ) -> CrossAttentionRecorder:
        """The recorder of one grounding (not yet entered): the selected layers, one token group per phrase (its
        tokens are averaged before each map is normalised, as the reference does), and the prompt branch's rows
        of the batch that :meth:`invert` runs inside the capture window (``[uncond, cond]`` when the unconditional
        branch drives, the prompt alone otherwise)."""
        rows = range(batch_size, 2 * batch_size) if self.drive == "uncond" else range(batch_size)
        return CrossAttentionRecorder(diffusion_model, self.layers, token_indices=token_indices, batch_indices=rows)

    def invert(
        self,
        latent: torch.Tensor,
        diffusion_model: torch.nn.Module,
        conditioning: torch.Tensor,
        uncond_conditioning: torch.Tensor,
        recorder: CrossAttentionRecorder | None = None,
    ) -> torch.Tensor:
        """The UNet passes of one grounding: DDIM inversion of ``latent`` on the library's one loop up to the end of
        the capture window, with a :class:`CaptureWindowHook` that runs the prompt's branch only inside the window,
        where ``recorder`` (entered by the caller) records. Without a recorder the same passes run with no
        attention hook (the benchmarks' baseline).

        Returns:
            the latent at the end of the capture window.
        """
        batch_size = latent.shape[0]
        inverse = DDIMInverseScheduler(self.scheduler)
        inverse.set_timesteps(self.num_inference_steps, self.timestep_spacing)
        captured = self.captured_steps()
        # the steps after the window do not change the maps: stop the inversion at its end
        timesteps = inverse.timesteps[: captured[-1] + 1]
        context = conditioning.expand(batch_size, *conditioning.shape[1:])
        uncond_context = uncond_conditioning.expand(batch_size, *uncond_conditioning.shape[1:])
        window = CaptureWindowHook(captured, self.drive, context, uncond_context, recorder)
        return _run_loop(
            diffusion_model,
            inverse,
            latent,
            timesteps,
            context=context,
            hooks=[window],
            progress_description="grounding inversion" if self.verbose else None,
        )

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: torch.nn.Module,
        autoencoder_model: torch.nn.Module,
        conditioning: torch.Tensor,
        uncond_conditioning: torch.Tensor,
        token_indices: Sequence[Sequence[int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(heatmaps, masks)``, each ``(B, P, *spatial)`` for ``P`` phrases, with the input's meta data.

        Args:
            inputs: images ``(B, C, *spatial)`` in the autoencoder's range, 2D or 3D.
            diffusion_model: a MONAI ``DiffusionModelUNet`` with cross-attention.
            autoencoder_model: its autoencoder.
            conditioning: the prompt's context ``(B or 1, L, D)`` (e.g. the report holding the phrases).
            uncond_conditioning: the empty prompt's context, same shape.
            token_indices: per phrase, its token positions within the prompt (``TextEncoder.phrase_token_indices``).
        """
        if not isinstance(inputs, torch.Tensor) or inputs.ndim not in (4, 5):
            raise ValueError(
                f"`inputs` must be a (B, C, H, W) or (B, C, H, W, D) tensor, got {getattr(inputs, 'shape', inputs)}."
            )
        check_finite("inputs", inputs)
        if isinstance(token_indices, (str, bytes)) or not token_indices or any(len(t) == 0 for t in token_indices):
            raise ValueError(
                f"`token_indices` must list at least one token position per phrase, got {token_indices!r}."
            )
        length = conditioning.shape[1]
        if any(not 0 <= int(i) < length for phrase in token_indices for i in phrase):
            raise ValueError(f"`token_indices` {token_indices!r} fall outside the prompt's {length} tokens.")
        recorder = self.recorder(diffusion_model, token_indices, inputs.shape[0])
        with torch.no_grad():
            # plain tensors inside: MetaTensor meta would follow the maps through batch indexing and smoothing
            images = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
            latent = encode_mean(autoencoder_model, images) * self.scale_factor
            with recorder:
                self.invert(latent, diffusion_model, conditioning, uncond_conditioning, recorder)
            phrase_maps = recorder.maps()  # (B, P, *latent)
        size = tuple(inputs.shape[2:])
        mode = "bilinear" if len(size) == 2 else "trilinear"
        heatmaps = F.interpolate(phrase_maps, size=size, mode=mode, align_corners=False)
        if self.sigma > 0:
            smooth = GaussianSmooth(self.sigma)
            heatmaps = torch.stack([torch.as_tensor(smooth(h)) for h in heatmaps])
        flat = heatmaps.flatten(2)
        low, high = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
        heatmaps = ((flat - low) / (high - low).clamp_min(1e-12)).view_as(heatmaps)
        masks = torch.stack([torch.as_tensor(OtsuThreshold()(h)) for h in heatmaps.cpu()]).to(heatmaps.device)
        if self.otsu:
            heatmaps = heatmaps * masks
        if isinstance(inputs, MetaTensor):
            return tuple(_with_meta_of(inputs, result) for result in (heatmaps, masks))  # type: ignore[return-value]
        return heatmaps, masks
