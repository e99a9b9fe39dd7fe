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
"""Fine-tuning a pretrained text-conditioned latent diffusion model on a small target set, with MONAI's
``SupervisedTrainer``, in the four modes that Latent Drifting (Yeganeh et al., arXiv 2412.20651) combines with
its drift δ:

- ``"full"``: every UNet weight learns;
- ``"dreambooth"`` (Ruiz et al. 2023): every UNet weight learns on prompts that carry an identifier word, plus a
  class-prior preservation loss on latents that the frozen model generated from the same prompts without it;
- ``"textual_inversion"`` (Gal et al. 2023): only the embedding of one new placeholder token learns;
- ``"custom_diffusion"`` (Kumari et al. 2023): the cross-attention key and value projections and a new token.

:class:`FineTuning` says which weights a mode trains, writes its prompts and is the checkpoint object (a
``state_dict`` with only what the mode changed); :class:`FineTunePrepareBatch` draws the training batches;
:class:`PriorPreservationLoss` is DreamBooth's loss. The drift goes in through the trainer's
``DriftDiffusionInferer`` (see :class:`~monai_cfx.engines.LatentDiffusionPrepareBatch`'s ``drift_inferer``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.schedulers import Scheduler

from monai_cfx.inferers import Drift, SamplingHook, denoise, sample_prompts
from monai_cfx.utils import check_option
from monai_cfx.visualize.attention import cross_attention_layers

from .latent_diffusion import LatentDiffusionPrepareBatch

__all__ = [
    "FINETUNE_MODES",
    "FineTunePrepareBatch",
    "FineTuning",
    "PriorPreservationLoss",
    "apply_finetuned",
    "generate_prior_latents",
    "load_finetuned",
    "prompt_with_token",
]

FINETUNE_MODES = ("full", "dreambooth", "textual_inversion", "custom_diffusion")
# modes that learn a new token's embedding, and the one whose identifier is an existing (rare) word
_NEW_TOKEN_MODES = ("textual_inversion", "custom_diffusion")
_TOKEN_MODES = ("dreambooth", *_NEW_TOKEN_MODES)


def _cross_attention_kv(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The key and value projections of a UNet's cross-attention (``attn2.to_k``/``to_v``), by parameter name."""
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError(
            "mode 'custom_diffusion' trains the cross-attention keys and values, but `unet` has no cross-attention "
            "layers (attn2): it must be built with with_conditioning=True."
        )
    return {
        f"{name}.{projection}.{key}": parameter
        for name, (block, _) in layers.items()
        for projection in ("to_k", "to_v")
        for key, parameter in getattr(block, projection).named_parameters()
    }


def prompt_with_token(text: str, token: str | None) -> str:
    """A prompt as a fine-tuned model reads it: ``"<token> text"``, or ``text`` without a token (mode ``full``)."""
    return f"{token} {text}" if token is not None else text


class FineTuning:
    """What a fine-tuning mode trains, how it writes prompts, and what its checkpoint holds.

    On construction the UNet and the text encoder are set up for ``mode``: parameters that the mode does not
    train get ``requires_grad=False``, and ``textual_inversion`` / ``custom_diffusion`` add ``token`` to the
    text encoder (:meth:`~monai_cfx.networks.nets.TextEncoder.add_tokens`). :meth:`parameters` gives the optimizer
    its parameters, :meth:`prompt` puts the token in front of a report, and :meth:`state_dict` /
    :meth:`load_state_dict` make the object a checkpoint item for MONAI's ``CheckpointSaver`` holding only what the
    mode changed (the whole UNet for ``full``/``dreambooth``; the keys and values and the token for
    ``custom_diffusion``; the token alone for ``textual_inversion``), plus the mode, the token and the drift.

    Args:
        mode: one of :data:`FINETUNE_MODES`.
        unet: the pretrained ``DiffusionModelUNet``.
        text_encoder: a :class:`~monai_cfx.networks.nets.TextEncoder` (frozen).
        token: the identifier word (``dreambooth``, e.g. ``"sks"``) or the new placeholder token
            (``textual_inversion``, ``custom_diffusion``, e.g. ``"<target-domain>"``); not used by ``full``.
        initializer: words whose embedding starts a new token (e.g. ``"radiograph"``).
        drift: the δ trained with (a :class:`~monai_cfx.inferers.Drift` or its value), recorded in the checkpoint so
            that inference uses the same one.

    Raises:
        ValueError: for an unknown ``mode``, a token-based mode without ``token``, a ``token`` given to ``full``,
            a placeholder already in the vocabulary, a ``drift`` that is not one number or one per latent channel,
            or ``custom_diffusion`` on a UNet without cross-attention.

    Example::

        tuning = FineTuning("textual_inversion", unet, text_encoder, token="<target-domain>", initializer="radiograph")
        optimizer = torch.optim.AdamW(tuning.parameters(), lr=5e-3)
        prompts = [tuning.prompt(report) for report in reports]  # "<target-domain> Chest radiograph with ..."
    """

    def __init__(
        self,
        mode: str,
        unet: torch.nn.Module,
        text_encoder: Any,
        token: str | None = None,
        initializer: str | None = None,
        drift: float | Sequence[float] | Drift = 0.0,
    ) -> None:
        self.mode = check_option("mode", mode, FINETUNE_MODES)
        if mode in _TOKEN_MODES and not (isinstance(token, str) and token.strip()):
            kind = (
                "an identifier word such as 'sks'" if mode == "dreambooth" else "a new token such as '<target-domain>'"
            )
            raise ValueError(f"mode {mode!r} needs `token`: {kind}; got {token!r}.")
        if mode == "full" and token is not None:
            raise ValueError(f"mode 'full' does not use `token` (got {token!r}); it is for {list(_TOKEN_MODES)}.")
        self.unet = unet
        self.text_encoder = text_encoder
        self.token = token.strip() if token is not None else None
        self.drift = Drift(drift)
        channels = getattr(unet, "in_channels", None)
        if channels is not None:
            # here, so that a wrong δ fails before training, not at its first step
            self.drift.check_channels(channels, channel="latent channel")
        if mode == "dreambooth" and not text_encoder.tokenizer(self.token, add_special_tokens=False)["input_ids"]:
            raise ValueError(f"the identifier `token` {self.token!r} maps to no token of the text encoder.")

        # every check before anything changes: a failed set-up leaves the UNet and the text encoder as they were
        self._unet_trained: dict[str, torch.nn.Parameter] = {}
        if mode == "custom_diffusion":
            self._unet_trained = _cross_attention_kv(unet)
        if mode in _NEW_TOKEN_MODES:
            if self.token in text_encoder.added_tokens:
                raise ValueError(f"the token {self.token!r} was already added to the text encoder.")
            text_encoder.add_tokens(self.token, initializer=initializer)  # checks the token before adding it
        unet.requires_grad_(mode in ("full", "dreambooth"))
        for parameter in self._unet_trained.values():
            parameter.requires_grad_(True)

    @property
    def trains_text(self) -> bool:
        """Whether gradients must flow through the text encoder (a new token's embedding learns)."""
        return self.mode in _NEW_TOKEN_MODES

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the mode trains, for the optimizer."""
        if self.mode in ("full", "dreambooth"):
            return list(self.unet.parameters())
        return list(self._unet_trained.values()) + self.text_encoder.token_embedding_parameters()

    def num_trainable(self) -> int:
        """Number of trained scalars."""
        return sum(parameter.numel() for parameter in self.parameters())

    def prompt(self, text: str) -> str:
        """``text`` with the mode's token in front (``"<token> text"``); ``text`` itself for ``full``."""
        return prompt_with_token(text, self.token)

    def state_dict(self) -> dict[str, Any]:
        """What the mode changed: ``{"mode", "token", "drift", "unet": {name: tensor}, "token_embeddings"}``.

        Plain tensors, strings and numbers only, so it loads with ``torch.load(..., weights_only=True)``.
        """
        if self.mode in ("full", "dreambooth"):
            unet_state = {name: tensor.detach().cpu().clone() for name, tensor in self.unet.state_dict().items()}
        else:
            unet_state = {name: parameter.detach().cpu().clone() for name, parameter in self._unet_trained.items()}
        state: dict[str, Any] = {
            "mode": self.mode,
            "token": self.token,
            "drift": self.drift.tolist(),
            "unet": unet_state,
        }
        if self.mode in _NEW_TOKEN_MODES:
            state["token_embeddings"] = self.text_encoder.token_embeddings_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Apply a :meth:`state_dict` (the mode must match); see :func:`load_finetuned`."""
        if state.get("mode") != self.mode:
            raise ValueError(f"the checkpoint was trained in mode {state.get('mode')!r}, not {self.mode!r}.")
        apply_finetuned(state, self.unet, self.text_encoder)


def apply_finetuned(state: Mapping[str, Any], unet: torch.nn.Module, text_encoder: Any) -> dict[str, Any]:
    """Apply a :meth:`FineTuning.state_dict` to a UNet holding the pretrained weights and a text encoder.

    Args:
        state: the checkpoint's dict (``mode``, ``token``, ``drift``, ``unet``, and ``token_embeddings`` for the
            modes that add a token).
        unet: the UNet with the pretrained weights; the checkpoint's tensors replace its own.
        text_encoder: the :class:`~monai_cfx.networks.nets.TextEncoder`; a new token is added to it.

    Returns:
        ``{"mode", "token", "drift"}`` of the checkpoint.

    Raises:
        ValueError: when ``state`` is not a fine-tuning checkpoint, lacks its token's embedding, or does not fit
            ``unet``.
    """
    missing = [key for key in ("mode", "token", "drift", "unet") if key not in state]
    if missing:
        raise ValueError(f"not a fine-tuning checkpoint: the keys {missing} are missing (keys: {sorted(state)}).")
    check_option("mode", state["mode"], FINETUNE_MODES)
    unet_state = dict(state["unet"])
    known = unet.state_dict()
    unknown = sorted(set(unet_state) - set(known))
    if unknown:
        raise ValueError(f"the checkpoint holds UNet tensors that `unet` lacks, e.g. {unknown[:3]}.")
    if state["mode"] in _NEW_TOKEN_MODES:
        embeddings = state.get("token_embeddings")
        if not isinstance(embeddings, Mapping) or state["token"] not in list(embeddings.get("tokens", [])):
            raise ValueError(
                f"a {state['mode']!r} checkpoint must hold the embedding of its token {state['token']!r} "
                "('token_embeddings')."
            )
    try:
        if state["mode"] in ("full", "dreambooth"):
            unet.load_state_dict(unet_state, strict=True)
        else:
            unet.load_state_dict({**known, **unet_state}, strict=True)
    except RuntimeError as error:  # missing tensors or other shapes: a checkpoint of another network
        raise ValueError(f"the checkpoint does not fit `unet`: {error}") from error
    if "token_embeddings" in state:
        text_encoder.load_token_embeddings(dict(state["token_embeddings"]))
    return {"mode": state["mode"], "token": state["token"], "drift": state["drift"]}


def load_finetuned(path: str | os.PathLike, unet: torch.nn.Module, text_encoder: Any) -> dict[str, Any]:
    """Load a fine-tuning checkpoint (written by ``CheckpointSaver`` from :class:`FineTuning`) with
    ``weights_only=True`` and apply it to ``unet`` (holding the pretrained weights) and ``text_encoder``.

    Returns:
        ``{"mode", "token", "drift"}``: write prompts with the token, and sample with the drift trained with.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not a fine-tuning checkpoint or does not fit ``unet``.

    Example::

        info = load_finetuned("models/finetuned_2d.pt", unet, text_encoder)
        prompt = prompt_with_token(report, info["token"])
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no fine-tuning checkpoint at {path!r}; run the bundle's finetune.json first.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} does not hold a fine-tuning checkpoint (a dict), got {type(state).__name__}.")
    try:
        return apply_finetuned(state, unet, text_encoder)
    except ValueError as error:
        raise ValueError(f"{path!r}: {error}") from error


def generate_prior_latents(
    unet: torch.nn.Module,
    scheduler: Scheduler,
    text_encoder: Any,
    prompts: Sequence[str],
    latent_shape: Sequence[int],
    seed: int = 0,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 50,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    verbose: bool = True,
    hooks: Sequence[SamplingHook] = (),
) -> torch.Tensor:
    """DreamBooth's class-prior samples: scaled latents that the frozen model generates from ``prompts``.

    The prior loss trains on latents, so they are kept as latents (no decode and re-encode round trip).

    Args:
        unet: the frozen pretrained UNet.
        scheduler: a MONAI sampling scheduler (DDIM); ``set_timesteps(num_inference_steps)`` is called here.
        text_encoder: the text encoder (before any token is added, or prompts without the token).
        prompts: one class prompt per prior sample (the target set's reports without the identifier).
        latent_shape: ``(C, *spatial)`` of a latent.
        seed: sample ``i`` starts from the noise of seed ``seed + i``.
        guidance_scale: classifier-free guidance weight.
        num_inference_steps: sampling steps.
        batch_size: samples per UNet batch.
        device: where to sample.
        verbose: a progress bar per batch.
        hooks: step hooks of the sampling loop (e.g. a :class:`~monai_cfx.inferers.DriftHook`).

    Returns:
        ``(len(prompts), C, *spatial)`` latents on the CPU.
    """
    scheduler.set_timesteps(num_inference_steps)
    unet = unet.to(device)
    was_training = unet.training
    unet.eval()

    def sample(noise: torch.Tensor, context: torch.Tensor, uncond_context: torch.Tensor) -> torch.Tensor:
        return denoise(
            unet,
            scheduler,
            noise,
            context=context,
            uncond_context=uncond_context,
            guidance_scale=guidance_scale,
            hooks=hooks,
            verbose=verbose,
        )

    try:
        seeds = [seed + i for i in range(len(prompts))]
        return sample_prompts(sample, text_encoder, prompts, seeds, latent_shape, batch_size, device)
    finally:
        unet.train(was_training)


class FineTunePrepareBatch(LatentDiffusionPrepareBatch):
    """``prepare_batch`` of a fine-tuning :class:`FineTuning` run with MONAI's ``SupervisedTrainer``.

    As :class:`~monai_cfx.engines.LatentDiffusionPrepareBatch` (latents from the frozen autoencoder, noise,
    timesteps, prompt dropout, the drift through ``drift_inferer``), with the prompts written by
    ``fine_tuning.prompt`` and, in the modes where a token's embedding learns, encoded with gradients (and not
    cached). For DreamBooth, pass ``prior_latents`` and ``prior_prompts``: every batch then gets as many prior
    samples as instances, appended after them, for :class:`PriorPreservationLoss`.

    Args:
        fine_tuning: the :class:`FineTuning` of the run.
        autoencoder, text_encoder, num_train_timesteps, scale_factor, scheduler, prediction_type, text_key,
        condition_drop_prob, seed, image_key, drift_inferer: as :class:`LatentDiffusionPrepareBatch`.
        prior_latents: DreamBooth's class-prior latents ``(P, C, *spatial)`` (:func:`generate_prior_latents`).
        prior_prompts: their class prompts, one per latent (without the identifier).

    Raises:
        ValueError: when DreamBooth runs without prior latents (or other modes get them), their counts differ, or
            ``fine_tuning.drift`` is not the drift of ``drift_inferer`` (0 without one).
    """

    def __init__(
        self,
        fine_tuning: FineTuning,
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
        prior_latents: torch.Tensor | None = None,
        prior_prompts: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            autoencoder,
            text_encoder,
            num_train_timesteps,
            scale_factor=scale_factor,
            scheduler=scheduler,
            prediction_type=prediction_type,
            text_key=text_key,
            condition_drop_prob=condition_drop_prob,
            seed=seed,
            image_key=image_key,
            drift_inferer=drift_inferer,
        )
        self.fine_tuning = fine_tuning
        trained = drift_inferer.drift if drift_inferer is not None else Drift(0.0)
        if fine_tuning.drift.values != trained.values:  # one number and a list of one are the same δ
            raise ValueError(
                f"`fine_tuning.drift` ({fine_tuning.drift.tolist()}) must be the drift the training uses "
                f"(`drift_inferer`: {trained.tolist()}), so that its checkpoint records the right one."
            )
        if (fine_tuning.mode == "dreambooth") != (prior_latents is not None):
            raise ValueError(
                "mode 'dreambooth' needs `prior_latents` (its class-prior preservation), and only it takes them; "
                f"got mode {fine_tuning.mode!r} with prior_latents={'given' if prior_latents is not None else None}."
            )
        if prior_latents is not None:
            prior_prompts = list(prior_prompts or [])
            if len(prior_prompts) != len(prior_latents):
                raise ValueError(
                    f"`prior_prompts` must have one prompt per prior latent ({len(prior_latents)}), "
                    f"got {len(prior_prompts)}."
                )
        self.prior_latents = prior_latents
        self.prior_prompts = prior_prompts

    def text_contexts(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.fine_tuning.trains_text:
            return self.text_encoder(list(prompts))  # with gradients to the new token's embedding
        return super().text_contexts(prompts)

    def diffusion_batch(
        self, latents: torch.Tensor, prompts: Sequence[str], device: Any, non_blocking: bool
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        """The parent's batch with the mode's prompts and, for DreamBooth, as many prior samples (with their class
        prompts) appended after the instances."""
        prompts = [self.fine_tuning.prompt(p) for p in prompts]
        if self.prior_latents is not None:
            rows = torch.randint(len(self.prior_latents), (len(prompts),), generator=self._generator).tolist()
            latents = torch.cat([latents, self.prior_latents[rows].to(latents)])
            prompts += [self.prior_prompts[row] for row in rows]  # type: ignore[index]
        return super().diffusion_batch(latents, prompts, device, non_blocking)


class PriorPreservationLoss(torch.nn.Module):
    """DreamBooth's loss: ``MSE(instances) + prior_loss_weight * MSE(prior samples)``, on a batch whose first half
    holds the instances and second half the prior samples (as :class:`FineTunePrepareBatch` builds it).

    Args:
        prior_loss_weight: λ, the weight of the class-prior term.
    """

    def __init__(self, prior_loss_weight: float = 1.0) -> None:
        super().__init__()
        if not prior_loss_weight >= 0:
            raise ValueError(f"`prior_loss_weight` must be >= 0, got {prior_loss_weight}.")
        self.prior_loss_weight = prior_loss_weight

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if prediction.shape[0] % 2:
            raise ValueError(
                f"the batch must hold as many prior samples as instances (an even size), got {prediction.shape[0]}."
            )
        prediction_instance, prediction_prior = prediction.float().chunk(2)
        target_instance, target_prior = target.float().chunk(2)
        instance_loss = torch.nn.functional.mse_loss(prediction_instance, target_instance)
        prior_loss = torch.nn.functional.mse_loss(prediction_prior, target_prior)
        return instance_loss + self.prior_loss_weight * prior_loss
