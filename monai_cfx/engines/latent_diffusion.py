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
"""Training pieces for text-conditioned latent diffusion with MONAI's ``SupervisedTrainer``.

The diffusion model is trained on latents of a frozen ``AutoencoderKL``, drawn in ``prepare_batch``:
the loss target of v-prediction, ``sqrt(a_t) * noise - sqrt(1 - a_t) * latent``, needs the latent, so
it is drawn here rather than inside ``LatentDiffusionInferer``. With ``EncodeLatentd`` in a cached
dataset the encoder runs once per image for the whole training, and each step only samples the
posterior. The trainer drives MONAI's ``DiffusionInferer`` on the latents; sampling uses MONAI's
``LatentDiffusionInferer`` with the same autoencoder and scale factor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import DiffusionPrepareBatch, PrepareBatch
from monai.networks.schedulers import Scheduler
from monai.utils import CommonKeys

from monai_cfx.utils import check_option

__all__ = [
    "AutoencoderKLLoss",
    "LatentDiffusionPrepareBatch",
    "ReconstructionPrepareBatch",
    "compute_scale_factor",
    "phrases_by_report",
]


class ReconstructionPrepareBatch(PrepareBatch):
    """``prepare_batch`` for autoencoders: the image is both the input and the target."""

    def __init__(self, image_key: str = CommonKeys.IMAGE) -> None:
        self.image_key = image_key

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images = torch.as_tensor(batchdata[self.image_key]).to(device, non_blocking=non_blocking, **kwargs)
        return images, images, (), {}


class AutoencoderKLLoss(torch.nn.Module):
    """L1 reconstruction plus a weighted KL divergence of MONAI ``AutoencoderKL``'s posterior to N(0, I), with an
    optional term on each image's worst-reconstructed voxels.

    Takes the ``(reconstruction, z_mu, z_sigma)`` tuple that ``AutoencoderKL.forward`` returns, so it
    plugs into ``SupervisedTrainer`` as ``loss_function`` with a ``SimpleInferer``.

    A small finding (a lesion of 40 voxels in a 32³ volume) is a fraction of a percent of the mean L1, so an
    autoencoder can erase it at almost no cost. ``hard_weight`` × the mean absolute error of each image's
    ``hard_fraction`` worst voxels gives the largest errors a weight of their own, wherever they are (edges and
    small findings alike), without masks or labels.

    Args:
        kl_weight: weight of the KL term.
        hard_fraction: fraction of each image's voxels (the largest absolute errors) in the hard-voxel term, in
            (0, 1]; used only when ``hard_weight`` > 0.
        hard_weight: weight of the hard-voxel term; 0 (default) is plain L1 + KL.
    """

    def __init__(self, kl_weight: float = 1e-6, hard_fraction: float = 0.01, hard_weight: float = 0.0) -> None:
        super().__init__()
        if kl_weight < 0:
            raise ValueError(f"`kl_weight` must be >= 0, got {kl_weight}.")
        if not 0 < hard_fraction <= 1:
            raise ValueError(f"`hard_fraction` must be in (0, 1], got {hard_fraction}.")
        if not hard_weight >= 0:
            raise ValueError(f"`hard_weight` must be >= 0, got {hard_weight}.")
        self.kl_weight = kl_weight
        self.hard_fraction = hard_fraction
        self.hard_weight = hard_weight

    def forward(self, outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        reconstruction, z_mu, z_sigma = outputs
        spatial = list(range(1, z_mu.ndim))
        kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1, dim=spatial)
        errors = (reconstruction.float() - target.float()).abs()
        loss = errors.mean() + self.kl_weight * kl.mean()
        if self.hard_weight > 0:
            per_image = errors.flatten(1)
            count = max(1, int(round(self.hard_fraction * per_image.shape[1])))
            loss = loss + self.hard_weight * per_image.topk(count, dim=1).values.mean()
        return loss


class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """``prepare_batch`` for text-conditioned latent diffusion training with ``SupervisedTrainer``.

    Draws scaled latents of the images from the frozen autoencoder's posterior (from the batch's
    ``image_z_mu``/``image_z_sigma`` that ``monai_cfx.transforms.EncodeLatentd`` cached, or by encoding
    the images when those keys are absent), draws noise and timesteps on them (MONAI's
    ``DiffusionPrepareBatch``), and encodes the batch's prompts with the text encoder.
    A fraction ``condition_drop_prob`` of the prompts is replaced by the empty prompt, so the model
    also learns the unconditional branch that classifier-free guidance needs. With ``phrase_prompts``, a fraction
    ``phrase_prompt_prob`` of the reports that have phrases is replaced first by one of their phrases, drawn at
    random ("large left pleural effusion" for a report that names it among others), so the model also learns each
    finding from its phrase alone, as phrase grounding prompts it. Prompt contexts are cached: training sets repeat
    their reports, and the text encoder is frozen.

    Returns ``(latents, target, (), {"noise", "timesteps", "condition"})`` for MONAI's ``DiffusionInferer``.

    Args:
        autoencoder: a trained MONAI ``AutoencoderKL`` (or anything with ``encode_stage_2_inputs``); kept frozen.
        text_encoder: ``monai_cfx.networks.nets.TextEncoder`` (or a callable prompts -> context).
        num_train_timesteps: the scheduler's ``num_train_timesteps``.
        scale_factor: latent scale (``compute_scale_factor`` gives ``1 / std`` of the data's latents).
        scheduler: MONAI scheduler; needed for ``prediction_type="v_prediction"`` (``get_velocity``).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``: what the model regresses.
        text_key: batch key of the prompts (a list of strings).
        condition_drop_prob: probability of replacing a prompt by ``""``.
        seed: seed of the prompt-dropout generator (which also draws the phrase prompts).
        phrase_prompts: report -> the phrases of its findings (e.g. from a datalist's ``phrases``); reports that are
            not keys, or have no phrases, are always kept.
        phrase_prompt_prob: probability of replacing a report that has phrases by one of them.
        image_key: batch key of the images (cached posteriors are ``<image_key>_z_mu`` and ``_z_sigma``).
        drift_inferer: the trainer's ``monai_cfx.inferers.DriftDiffusionInferer`` for Latent Drifting: it adds
            the drift δ to the noise it is given, and the target becomes its ``training_target`` (``ε + δ``,
            or the drifted velocity), with its scheduler's prediction type. The noise returned stays undrifted,
            so δ is added once.

    Example::

        prepare_batch = LatentDiffusionPrepareBatch(autoencoder, TextEncoder(), 1000, scale_factor=1.2)
        trainer = SupervisedTrainer(device, max_epochs, loader, unet, optimizer, torch.nn.MSELoss(),
                                    inferer=DiffusionInferer(scheduler), prepare_batch=prepare_batch)
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        text_encoder: Any,
        num_train_timesteps: int,
        scale_factor: float | torch.Tensor = 1.0,
        scheduler: Scheduler | None = None,
        prediction_type: str = "epsilon",
        text_key: str = "report",
        condition_drop_prob: float = 0.1,
        seed: int = 0,
        image_key: str = "image",
        drift_inferer: Any | None = None,
        phrase_prompts: Mapping[str, Sequence[str]] | None = None,
        phrase_prompt_prob: float = 0.0,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=None)
        if drift_inferer is not None:
            if not callable(getattr(drift_inferer, "training_target", None)):
                raise ValueError(
                    "`drift_inferer` must be a DriftDiffusionInferer (with training_target), "
                    f"got {type(drift_inferer).__name__}."
                )
            drift_prediction = drift_inferer.scheduler.prediction_type
            if (scheduler is not None and scheduler is not drift_inferer.scheduler) or (
                prediction_type != "epsilon" and prediction_type != drift_prediction
            ):
                raise ValueError(
                    "with `drift_inferer`, the scheduler and prediction type are the inferer's "
                    f"({drift_prediction!r}); leave `scheduler` and `prediction_type` unset."
                )
            scheduler, prediction_type = drift_inferer.scheduler, drift_prediction
        check_option("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        if prediction_type == "v_prediction" and scheduler is None:
            raise ValueError("`scheduler` is required for prediction_type='v_prediction' (it computes the velocity).")
        if not 0.0 <= condition_drop_prob <= 1.0:
            raise ValueError(f"`condition_drop_prob` must be in [0, 1], got {condition_drop_prob}.")
        if not 0.0 <= phrase_prompt_prob <= 1.0:
            raise ValueError(f"`phrase_prompt_prob` must be in [0, 1], got {phrase_prompt_prob}.")
        self.phrase_prompts = {
            str(report): [str(p) for p in phrases] for report, phrases in (phrase_prompts or {}).items()
        }
        if phrase_prompt_prob > 0 and not any(self.phrase_prompts.values()):
            raise ValueError(
                f"`phrase_prompt_prob` is {phrase_prompt_prob} but `phrase_prompts` gives no report a phrase: pass "
                "report -> phrases (e.g. from the datalist's 'phrases'), or set phrase_prompt_prob to 0."
            )
        self.phrase_prompt_prob = phrase_prompt_prob
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.scale_factor = float(scale_factor)
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.text_key = text_key
        self.image_key = image_key
        self.condition_drop_prob = condition_drop_prob
        self.drift_inferer = drift_inferer
        self._generator = torch.Generator().manual_seed(seed)
        self._contexts: dict[str, torch.Tensor] = {}

    @property
    def generator(self) -> torch.Generator:
        """The prompt-dropout generator (seeded with ``seed``), e.g. for
        :class:`~monai_cfx.handlers.TrainingStateHandler` to save and restore its state."""
        return self._generator

    def text_contexts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Contexts ``(B, L, D)`` of ``prompts`` (on the CPU), encoding only prompts not seen before."""
        missing = sorted({p for p in prompts if p not in self._contexts})
        if missing:
            with torch.no_grad():
                encoded = self.text_encoder(missing)
            self._contexts.update({p: c.detach().cpu() for p, c in zip(missing, encoded)})
        return torch.stack([self._contexts[p] for p in prompts])

    def posterior(
        self, batchdata: Mapping[str, Any], images: torch.Tensor, device: Any, non_blocking: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior ``(z_mu, z_sigma)``: the cached ones (``EncodeLatentd``), else a fresh encoding."""
        mu_key, sigma_key = f"{self.image_key}_z_mu", f"{self.image_key}_z_sigma"
        with torch.no_grad():
            if mu_key in batchdata and sigma_key in batchdata:
                z_mu = torch.as_tensor(batchdata[mu_key]).to(device, non_blocking=non_blocking)
                z_sigma = torch.as_tensor(batchdata[sigma_key]).to(device, non_blocking=non_blocking)
                return z_mu, z_sigma
            return self.autoencoder.encode(images)

    def latents(
        self, batchdata: Mapping[str, Any], images: torch.Tensor, device: Any, non_blocking: bool
    ) -> torch.Tensor:
        """Unscaled latents: a posterior sample from cached ``(z_mu, z_sigma)``, else a fresh encoding."""
        if f"{self.image_key}_z_mu" not in batchdata or f"{self.image_key}_z_sigma" not in batchdata:
            with torch.no_grad():  # any first-stage model (a VQ-VAE has no posterior)
                return self.autoencoder.encode_stage_2_inputs(images)
        z_mu, z_sigma = self.posterior(batchdata, images, device, non_blocking)
        with torch.no_grad():
            return self.autoencoder.sampling(z_mu, z_sigma)

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.drift_inferer is not None:
            return self.drift_inferer.training_target(images, noise, timesteps)
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)  # type: ignore[union-attr]
        return noise

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images = torch.as_tensor(batchdata[self.image_key]).to(device, non_blocking=non_blocking, **kwargs)
        latents = self.latents(batchdata, images, device, non_blocking) * self.scale_factor
        prompts = batchdata.get(self.text_key)
        if prompts is None:
            raise ValueError(f"the batch has no {self.text_key!r} key with prompts (keys: {sorted(batchdata)}).")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"the batch has {images.shape[0]} images but {len(prompts)} prompts in {self.text_key!r}.")
        return self.diffusion_batch(latents, prompts, device, non_blocking)

    def diffusion_batch(
        self, latents: torch.Tensor, prompts: Sequence[str], device: Any, non_blocking: bool
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        """The trainer's batch for scaled ``latents`` and their ``prompts``: prompt dropout, contexts, noise,
        timesteps and the loss target."""
        if self.phrase_prompt_prob > 0:  # no draw otherwise: runs without phrase prompts keep their random stream
            swapped = torch.rand(len(prompts), generator=self._generator) < self.phrase_prompt_prob
            picks = torch.rand(len(prompts), generator=self._generator)
            prompts = [
                phrases[int(pick * len(phrases))] if swap and (phrases := self.phrase_prompts.get(prompt)) else prompt
                for prompt, swap, pick in zip(prompts, swapped.tolist(), picks.tolist())
            ]
        dropped = torch.rand(len(prompts), generator=self._generator) < self.condition_drop_prob
        prompts = ["" if drop else prompt for prompt, drop in zip(prompts, dropped.tolist())]
        condition = self.text_contexts(prompts).to(device, non_blocking=non_blocking)
        noise = self.get_noise(latents)
        timesteps = self.get_timesteps(latents)
        target = self.get_target(latents, noise, timesteps)
        return latents, target, (), {"noise": noise, "timesteps": timesteps, "condition": condition}


def phrases_by_report(
    items: Iterable[Mapping[str, Any]], report_key: str = "report", phrases_key: str = "phrases"
) -> dict[str, list[str]]:
    """Report -> the phrases of its findings, from datalist items (``LatentDiffusionPrepareBatch``'s
    ``phrase_prompts``). A phrase is a string or a dict with ``"text"`` (as the phantom datalists write them); items
    without phrases are left out, and a report that comes with several lists gets each phrase once."""
    mapping: dict[str, list[str]] = {}
    for item in items:
        phrases = [p["text"] if isinstance(p, Mapping) else str(p) for p in item.get(phrases_key) or []]
        if phrases:
            known = mapping.setdefault(str(item[report_key]), [])
            known.extend(phrase for phrase in phrases if phrase not in known)
    return mapping


def compute_latent_range(
    autoencoder: torch.nn.Module,
    data: Iterable[Mapping[str, Any]],
    scale_factor: float,
    device: str | torch.device = "cpu",
    max_batches: int = 8,
    image_key: str = CommonKeys.IMAGE,
) -> dict[str, list[float]]:
    """Per-channel minimum and maximum of the scaled latents (``scale_factor`` × the autoencoder's) over up to
    ``max_batches`` batches, as ``{"low": [...], "high": [...]}``: the bounds that
    :class:`~monai_cfx.inferers.ClipOriginalSampleHook` keeps the predicted clean latent within while sampling."""
    autoencoder = autoencoder.to(device).eval()
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None
    # the posterior samples and the loader's seed draw from the global generators: forked, so that a training run
    # that measures the range keeps the random stream (and so the weights) of one that does not
    with (
        torch.no_grad(),
        torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []),
    ):
        for index, batch in enumerate(data):
            if index >= max_batches:
                break
            latents = autoencoder.encode_stage_2_inputs(torch.as_tensor(batch[image_key]).to(device)).cpu()
            latents = latents.float().transpose(0, 1).flatten(1) * float(scale_factor)  # (C, everything else)
            batch_low, batch_high = latents.min(1).values, latents.max(1).values
            low = batch_low if low is None else torch.minimum(low, batch_low)
            high = batch_high if high is None else torch.maximum(high, batch_high)
    if low is None or high is None:
        raise ValueError("`data` yielded no batch: cannot measure the latent range.")
    return {"low": [float(v) for v in low], "high": [float(v) for v in high]}


def compute_scale_factor(
    autoencoder: torch.nn.Module,
    data: Iterable[Mapping[str, Any]],
    device: str | torch.device = "cpu",
    max_batches: int = 8,
    image_key: str = CommonKeys.IMAGE,
) -> float:
    """``1 / std`` of the autoencoder's latents over up to ``max_batches`` batches (Rombach et al. 2022, sec. 4.3.2).

    Scaling latents to unit variance keeps the diffusion schedule's signal-to-noise ratios meaningful.
    """
    autoencoder = autoencoder.to(device).eval()
    latents = []
    with torch.no_grad():
        for index, batch in enumerate(data):
            if index >= max_batches:
                break
            latents.append(autoencoder.encode_stage_2_inputs(torch.as_tensor(batch[image_key]).to(device)).cpu())
    if not latents:
        raise ValueError("`data` yielded no batch: cannot estimate the latent scale factor.")
    std = float(torch.cat([z.flatten() for z in latents]).std())
    if not std > 0:
        raise ValueError(f"the latents have standard deviation {std}; is the autoencoder trained?")
    return 1.0 / std
