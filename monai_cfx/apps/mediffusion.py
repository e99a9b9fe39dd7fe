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
"""The Mediffusion bundle's jobs (Kaleta et al., arXiv 2411.09434): build the joint network from the latent diffusion
bundle's UNet, wire the semi-supervised trainer's optional parts, publish the trained model, evaluate the head and
explain a prediction by removing the findings the head sees with classifier guidance (the configs hold the
choices; the mechanisms live in ``networks``, ``engines`` and ``inferers``)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_roc_auc

from monai_cfx.apps.bundle_io import to_scan_grid
from monai_cfx.engines import DiffMatchLoss, LabelledBatchSampler, StrongLatentAugment
from monai_cfx.inferers import ClassifierGuidanceHook, CounterfactualInferer
from monai_cfx.metrics import oracle_predict
from monai_cfx.networks.nets import JointDiffusionUNet, unet_from_config
from monai_cfx.networks.utils import encode_mean
from monai_cfx.transforms import DifferenceMap
from monai_cfx.utils import (
    atomic_directory,
    atomic_path,
    check_writable,
    load_weights,
    write_json,
    write_metrics,
    write_nifti,
)
from monai_cfx.visualize import plot_image_strip

__all__ = [
    "check_training_outputs",
    "diffmatch_parts",
    "evaluate_head",
    "evaluate_counterfactuals",
    "evaluate_targeted_removal",
    "explain_predictions",
    "head_features",
    "head_output",
    "head_probabilities",
    "joint_network",
    "labelled_batch_sampler",
    "load_images",
    "load_joint_network",
    "oracle_baseline",
    "publish_model",
    "removal_prompts",
    "stable_diffusion_joint_network",
]

logger = logging.getLogger(__name__)


def _unet_arguments(unet_config: Any) -> dict[str, Any]:
    """The keyword arguments of a ``DiffusionModelUNet`` config (a MONAI ``ConfigComponent`` or a mapping), without
    the config's own ``_target_``-style keys."""
    resolve = getattr(unet_config, "resolve_args", None)
    arguments = resolve() if callable(resolve) else unet_config
    if not isinstance(arguments, Mapping):
        raise ValueError(f"`unet_config` must be a DiffusionModelUNet config, got {type(unet_config).__name__}.")
    return {key: value for key, value in arguments.items() if not str(key).startswith("_")}


def joint_network(
    unet_config: Any,
    num_classes: int,
    classifier_hidden: int = 2048,
    classifier_dropout: float = 0.3,
    pretrained_path: str | os.PathLike | None = None,
    classifier_norm: str | None = None,
    classifier_pooling: str = "mean",
) -> JointDiffusionUNet:
    """A :class:`~monai_cfx.networks.nets.JointDiffusionUNet` with the arguments of a plain ``DiffusionModelUNet``
    config (the latent diffusion bundle's ``diffusion_def``) and a head of ``num_classes`` outputs (``classifier_*``:
    the network's head arguments), initialised from
    the plain UNet checkpoint ``pretrained_path`` (``load_unet_state_dict``: every UNet key must fit, only the head
    is new) when given.

    Raises:
        FileNotFoundError: when ``pretrained_path`` does not exist.
        ValueError: for a checkpoint of another UNet, or whose head does not fit ``num_classes``.
    """
    network = JointDiffusionUNet(
        **_unet_arguments(unet_config),
        num_classes=num_classes,
        classifier_hidden=classifier_hidden,
        classifier_dropout=classifier_dropout,
        classifier_norm=classifier_norm,
        classifier_pooling=classifier_pooling,
    )
    if pretrained_path is None:
        return network
    path = Path(pretrained_path)
    if not path.is_file():
        raise FileNotFoundError(f"`pretrained_path` {str(path)!r} does not exist.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    state = {key.removeprefix("module."): value for key, value in state.items()}
    try:
        new_keys = network.load_unet_state_dict(state)
    except ValueError as error:
        raise ValueError(f"`pretrained_path` {str(path)!r}: {error}") from error
    logger.info(f"initialised the joint network from {str(path)!r}; new (trained from scratch): {new_keys}")
    return network


def load_joint_network(
    unet_config: Any,
    num_classes: int,
    path: str | os.PathLike,
    classifier_hidden: int = 2048,
    classifier_dropout: float = 0.3,
    classifier_norm: str | None = None,
    classifier_pooling: str = "mean",
) -> JointDiffusionUNet:
    """A trained joint network (:func:`joint_network`'s architecture) with the weights at ``path`` (a state dict,
    or an ignite checkpoint holding it under ``"model"``), every key required, in ``eval()`` mode.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for a checkpoint whose head does not fit ``num_classes`` (the message names it), or of another
            network (a plain UNet without a head, another UNet).
    """
    network = joint_network(
        unet_config,
        num_classes,
        classifier_hidden,
        classifier_dropout,
        classifier_norm=classifier_norm,
        classifier_pooling=classifier_pooling,
    )
    return load_weights(network, path, key="model").eval()


def stable_diffusion_joint_network(
    stable_diffusion: Any,
    num_classes: int,
    classifier_hidden: int = 2048,
    classifier_dropout: float = 0.3,
    joint_path: str | os.PathLike | None = None,
    classifier_norm: str | None = None,
    classifier_pooling: str = "mean",
) -> JointDiffusionUNet:
    """A :class:`~monai_cfx.networks.nets.JointDiffusionUNet` with the architecture of a Stable Diffusion folder's
    UNet (``stable_diffusion``: :func:`~monai_cfx.networks.nets.load_stable_diffusion`'s result) and a head of
    ``num_classes`` outputs: initialised from the folder's converted UNet weights (only the head is new), or, with
    ``joint_path``, a trained joint network (every key required, in ``eval()`` mode).

    Raises:
        FileNotFoundError: when ``joint_path`` does not exist.
        ValueError: for a ``joint_path`` checkpoint of another network or head size.
    """
    network = unet_from_config(
        stable_diffusion.unet_config,
        network_class=JointDiffusionUNet,
        num_classes=num_classes,
        classifier_hidden=classifier_hidden,
        classifier_dropout=classifier_dropout,
        classifier_norm=classifier_norm,
        classifier_pooling=classifier_pooling,
    )
    if joint_path is not None:
        return load_weights(network, joint_path, key="model").eval()
    new_keys = network.load_unet_state_dict(stable_diffusion.unet.state_dict())
    logger.info(f"initialised the joint network from the Stable Diffusion UNet; new (trained from scratch): {new_keys}")
    return network


def labelled_batch_sampler(
    labelled_indices: Sequence[int],
    unlabelled_indices: Sequence[int],
    batch_size: int,
    labelled_batch_fraction: float = 0.25,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
) -> LabelledBatchSampler:
    """A :class:`~monai_cfx.engines.LabelledBatchSampler` of ``batch_size`` items, ``labelled_batch_fraction`` of
    them labelled (rounded, at least 1); every item labelled when there is no unlabelled index (fraction 1). With
    ``num_replicas`` processes, ``rank`` keeps its share of each epoch's batches (``batch_size`` is per process).

    Raises:
        ValueError: for a ``batch_size`` below 2 with unlabelled items, or a ``labelled_batch_fraction`` outside
            (0, 1).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
    if not unlabelled_indices:
        return LabelledBatchSampler(labelled_indices, [], batch_size, 0, seed, num_replicas, rank)
    valid = isinstance(labelled_batch_fraction, Real) and not isinstance(labelled_batch_fraction, bool)
    if not valid or not 0.0 < labelled_batch_fraction < 1.0:
        raise ValueError(f"`labelled_batch_fraction` must be in (0, 1), got {labelled_batch_fraction!r}.")
    if batch_size < 2:
        raise ValueError(f"`batch_size` must be >= 2 to hold labelled and unlabelled items, got {batch_size}.")
    labelled = min(batch_size - 1, max(1, round(labelled_batch_fraction * batch_size)))
    unlabelled = min(batch_size - labelled, len(unlabelled_indices))
    return LabelledBatchSampler(labelled_indices, unlabelled_indices, labelled, unlabelled, seed, num_replicas, rank)


def diffmatch_parts(
    enabled: bool,
    threshold: float = 0.95,
    weight: float = 1.0,
    noise_std: float = 0.3,
    feature_dropout: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """DiffMatch's strong view and loss (``{"strong_augment", "loss"}``), or ``None`` for both when not
    ``enabled``: what :class:`~monai_cfx.engines.JointDiffusionInferer` and
    :class:`~monai_cfx.engines.JointDiffusionLoss` take."""
    if not isinstance(enabled, bool):
        raise ValueError(f"`diffmatch` must be a bool (on the command line: --diffmatch True), got {enabled!r}.")
    if not enabled:
        return {"strong_augment": None, "loss": None}
    return {
        "strong_augment": StrongLatentAugment(noise_std=noise_std, feature_dropout=feature_dropout, seed=seed),
        "loss": DiffMatchLoss(threshold=threshold, weight=weight),
    }


def head_output(output: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``output_transform`` of a classification metric (MONAI's ``ROCAUC``) on an evaluator that runs
    :class:`~monai_cfx.engines.JointDiffusionInferer` (``decollate=False``; its ``(noise_prediction, logits)``, or
    the logits alone with ``classify_only``): the head's probabilities ``(B, K)`` and the labels ``(B, K)``."""
    logits = output["pred"] if isinstance(output["pred"], torch.Tensor) else output["pred"][1]
    label = output["label"]["label"]
    return torch.sigmoid(logits.float()).detach(), label.reshape(logits.shape).float()


def check_training_outputs(
    output_dir: str | os.PathLike,
    model_path: str | os.PathLike,
    overwrite: bool,
    training_state_path: str | os.PathLike | None = None,
) -> None:
    """Refuse, before any training, a published model that exists (unless ``overwrite``), and a run folder that
    exists unless ``overwrite`` or it holds ``training_state_path`` (a killed run that this one resumes)."""
    check_writable(model_path, overwrite)
    resumable = training_state_path is not None and Path(training_state_path).is_file()
    if Path(output_dir).exists() and not (overwrite or resumable):
        raise FileExistsError(
            f"output folder {str(output_dir)!r} exists and holds no training state to resume; pass --overwrite True "
            "to replace it."
        )


def publish_model(
    checkpoint_path: str | os.PathLike,
    model_path: str | os.PathLike,
    results: Mapping[str, Any],
    settings: Mapping[str, Any],
    record_path: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Copy the best checkpoint of a run onto ``model_path`` atomically (never over an existing file unless
    ``overwrite``) and write the run's ``results`` (best validation AUROC, the split) with its ``settings`` as JSON
    at ``record_path`` (:func:`~monai_cfx.utils.write_metrics`: an undefined AUROC is written as null).

    Raises:
        FileNotFoundError: when the run saved no best checkpoint (no validation ran).
        FileExistsError: when ``model_path`` exists and ``overwrite`` is False.
    """
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(
            f"no best checkpoint at {str(checkpoint_path)!r}: the validation never ran (check `val_interval`)."
        )
    with atomic_path(model_path, overwrite) as tmp:
        shutil.copyfile(checkpoint_path, tmp)
    write_metrics(results, record_path, settings=settings, overwrite=overwrite)
    logger.info(f"published the best model (by validation AUROC) at {str(model_path)!r}")
    return Path(model_path)


def oracle_baseline(
    latent_diffusion_root: str | os.PathLike,
    latent_diffusion_configs: Sequence[str],
    labelled_items: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    model_name: str,
    max_epochs: int,
    val_interval: int = 1,
    log_every: int = 25,
    **overrides: Any,
) -> Any:
    """The image-space baseline of the joint model's classification results: the latent diffusion bundle's oracle
    (``oracle_def``) trained by that bundle's ``configs/train_oracle.json`` (its optimiser, learning rate, batch size
    and augmentation) on ``labelled_items`` only, validated every ``val_interval`` epochs on its validation split
    (macro AUROC) with the best checkpoint kept as ``output_dir/<model_name>_best.pt``. The oracle's own final
    checkpoint (the shipped ``oracle_<dims>.pt``) is never written.

    Returns:
        the parsed training config (``parser.get_parsed_content("train#trainer").run()`` trains).
    """
    from monai_cfx.apps.bundle_config import load_bundle_config

    if not labelled_items:
        raise ValueError("`labelled_items` is empty: the baseline needs labelled training items.")
    handlers = {
        "train#handlers": [
            {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
             "interval": int(val_interval)},
            {"_target_": "StatsHandler", "tag_name": "train_loss", "output_transform":
             "$monai.handlers.from_engine(['loss'], first=True)", "iteration_log":
             f"$lambda engine, iteration: iteration % {int(log_every)} == 0"},
        ],
        "validate#handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "CheckpointSaver", "save_dir": str(output_dir), "save_dict": {"model": "@network"},
             "save_key_metric": True, "key_metric_filename": f"{model_name}_best.pt"},
        ],
    }  # fmt: skip
    return load_bundle_config(
        latent_diffusion_root,
        [*latent_diffusion_configs, "configs/train_oracle.json"],
        **overrides,
        max_epochs=int(max_epochs),
        **{"train#dataset#data": [dict(item) for item in labelled_items]},
        **handlers,
    )


def load_images(
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    data_list_key: str,
    preprocessing: Any,
    num_items: int | None = None,
    require_labels: bool = False,
    autoencoder: torch.nn.Module | None = None,
    max_reconstruction_mse: float | None = None,
) -> dict[str, Any]:
    """The scans of a MONAI datalist's ``data_list_key`` items (the first ``num_items``), brought to the model's
    input by ``preprocessing`` (:func:`~monai_cfx.transforms.scan_preprocessing`: any size, NIfTI, DICOM, PNG or
    JPEG, the intensity rule), refused when they cannot be made meaningful or (with ``autoencoder`` and
    ``max_reconstruction_mse``) are not scans of the model's kind: :func:`~monai_cfx.apps.bundle_io.prepare_scans`'s
    ``{"images", "prepared", "names", "affines"}`` plus ``labels`` ``(N, K)`` (``None`` when an item has none).

    Raises:
        FileNotFoundError: when the datalist does not exist.
        ValueError: for no items, a ``num_items`` below 1, an empty or missing ``image``, a scan that cannot be
            used (the message names the file), or missing labels when ``require_labels``.
    """
    from monai_cfx.apps.bundle_io import load_datalist, prepare_scans

    if num_items is not None and (isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1):
        raise ValueError(f"`num_items` must be an int >= 1 or null, got {num_items!r}.")
    items = load_datalist(datalist, data_list_key, dataset_dir, path_keys=["image"])
    items = items[:num_items] if num_items is not None else items
    inputs = prepare_scans(items, preprocessing, autoencoder, max_reconstruction_mse)
    labelled = all("label" in item for item in items)
    if require_labels and not labelled:
        missing = [index for index, item in enumerate(items) if "label" not in item]
        raise ValueError(f"datalist {str(datalist)!r}: {data_list_key} items {missing[:5]} have no 'label'.")
    labels = (
        torch.stack([torch.as_tensor(item["label"], dtype=torch.float32).reshape(-1) for item in items])
        if labelled
        else None
    )
    return {**inputs, "labels": labels}


@torch.no_grad()
def head_features(
    network: JointDiffusionUNet,
    autoencoder: torch.nn.Module,
    images: torch.Tensor,
    scale_factor: float,
    context: torch.Tensor | None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """What the head reads for ``images`` ``(N, C, *spatial)``: ``network.features`` ``(N, F)`` of the posterior mean
    times ``scale_factor`` at ``t = 0``, with ``context`` ``(1, L, D)`` (the empty prompt's, as the head was trained)
    expanded to each batch."""
    network, autoencoder = network.to(device).eval(), autoencoder.to(device).eval()
    features = []
    for start in range(0, len(images), batch_size):
        latent = encode_mean(autoencoder, images[start : start + batch_size].to(device)) * scale_factor
        batch_context = None if context is None else context.to(latent).expand(len(latent), *context.shape[1:])
        timesteps = torch.zeros(len(latent), dtype=torch.long, device=latent.device)
        features.append(network.features(latent, timesteps, batch_context).float().cpu())
    return torch.cat(features)


@torch.no_grad()
def head_probabilities(
    network: JointDiffusionUNet,
    autoencoder: torch.nn.Module,
    images: torch.Tensor,
    scale_factor: float,
    context: torch.Tensor | None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The head's probabilities ``(N, K)`` of ``images``: the head on :func:`head_features` (``classify`` at
    ``t = 0``, as the head was trained)."""
    features = head_features(network, autoencoder, images, scale_factor, context, batch_size, device)
    return torch.sigmoid(network.classify_features(features.to(device))).float().cpu()


def _auroc(probabilities: torch.Tensor, labels: torch.Tensor, label_names: Sequence[str]) -> dict[str, Any]:
    """Per-finding AUROC (every class kept; NaN, written as null, where a finding has one class only) and their
    mean over the defined ones."""
    aurocs = np.atleast_1d(np.asarray(compute_roc_auc(probabilities, labels.float(), average="none"), dtype=float))
    defined = aurocs[np.isfinite(aurocs)]
    return {
        "auroc": {name: float(value) for name, value in zip(label_names, aurocs)},
        "auroc_macro": float(defined.mean()) if len(defined) else math.nan,
        "num_findings_defined": int(len(defined)),
    }


def evaluate_head(
    network: torch.nn.Module,
    autoencoder: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    label_names: Sequence[str],
    scale_factor: float,
    context: torch.Tensor | None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Per-finding and macro AUROC (MONAI's ``compute_roc_auc``) of a classifier on labelled images, with the
    positive count of each finding and the accuracy at 0.5. ``network`` is the joint network (its head on the
    latents, :func:`head_probabilities`) or an image classifier with ``logits_and_embedding``, such as the
    :func:`oracle_baseline` (``autoencoder``, ``scale_factor`` and ``context`` are then unused).

    Raises:
        ValueError: when the labels do not have one column per finding of ``label_names``.
    """
    labels = torch.as_tensor(labels).float().reshape(len(images), -1)
    if labels.shape[1] != len(label_names):
        raise ValueError(f"the labels have {labels.shape[1]} findings, `label_names` {len(label_names)}.")
    if isinstance(network, JointDiffusionUNet):
        probabilities = head_probabilities(network, autoencoder, images, scale_factor, context, batch_size, device)
    else:
        from monai_cfx.metrics import oracle_predict

        probabilities, _ = oracle_predict(network, images, batch_size, device)
    if probabilities.shape[1] != len(label_names):
        raise ValueError(
            f"the classifier gives {probabilities.shape[1]} outputs, `label_names` names {len(label_names)} findings."
        )
    accuracy = ((probabilities > 0.5) == (labels > 0.5)).float().mean(0)
    return {
        "num_images": int(len(images)),
        **_auroc(probabilities, labels, label_names),
        "positives": {name: int(count) for name, count in zip(label_names, (labels > 0.5).sum(0).tolist())},
        "accuracy_at_0.5": {name: float(value) for name, value in zip(label_names, accuracy.tolist())},
    }


def _removal_target(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """Classifier guidance targets: 0 (remove) for the findings predicted (``p > threshold``), NaN (leave) else."""
    return torch.where(
        probabilities > threshold, torch.zeros_like(probabilities), torch.full_like(probabilities, math.nan)
    )


def removal_prompts(
    target: torch.Tensor, label_names: Sequence[str], finding_phrases: Mapping[str, str], template: str
) -> list[str]:
    """One negative prompt per image that names the findings it removes (``target`` 0; NaN leaves a finding alone),
    e.g. ``template="Chest radiograph with {findings}."`` and ``finding_phrases={"effusion": "a pleural effusion",
    ...}`` give ``"Chest radiograph with a pleural effusion and a nodule."``; ``""`` (the empty prompt) for an image
    that removes nothing. Classifier-free guidance from this prompt towards the empty one pushes away from the named
    findings only, so the findings the edit leaves alone stay (a healthy prompt would remove them too).

    Raises:
        ValueError: when ``finding_phrases`` lacks a label name, ``template`` has no ``{findings}`` field, or
            ``target`` is not ``(B, len(label_names))``.
    """
    missing = [name for name in label_names if name not in finding_phrases]
    if missing:
        raise ValueError(
            f"`finding_phrases` lacks a phrase for {missing}; give one per label name {list(label_names)}."
        )
    if "{findings}" not in template:
        raise ValueError(f"`negative_prompt_template` must contain '{{findings}}', got {template!r}.")
    if target.ndim != 2 or target.shape[1] != len(label_names):
        raise ValueError(
            f"the removal target must be (B, {len(label_names)}) for label names {list(label_names)}, "
            f"got {tuple(target.shape)}."
        )
    prompts = []
    for row in target.tolist():
        phrases = [finding_phrases[name] for name, value in zip(label_names, row) if value == 0]
        if not phrases:
            prompts.append("")
            continue
        joined = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        prompts.append(template.format(findings=joined))
    return prompts


def _guidance_contexts(
    text_encoder: Any,
    target: torch.Tensor,
    empty: torch.Tensor,
    label_names: Sequence[str],
    finding_phrases: Mapping[str, str] | None,
    template: str,
) -> torch.Tensor:
    """The edit's unconditional context: the empty prompt's, or with ``finding_phrases`` each image's negative
    prompt (:func:`removal_prompts`), which is also the context DDIM inversion runs under."""
    if finding_phrases is None:
        return empty
    with torch.no_grad():
        return text_encoder(removal_prompts(target, label_names, finding_phrases, template)).to(empty.device)


def _guided_edits(
    inferer: CounterfactualInferer,
    network: JointDiffusionUNet,
    autoencoder: torch.nn.Module,
    text_encoder: Any,
    images: torch.Tensor,
    target: torch.Tensor,
    conditioning: torch.Tensor,
    empty: torch.Tensor,
    *,
    guidance_scale: float,
    through_denoiser: bool,
    label_names: Sequence[str],
    finding_phrases: Mapping[str, str] | None,
    template: str,
    batch_size: int,
    device: str | torch.device,
) -> torch.Tensor:
    """The counterfactuals of ``images`` (on the CPU, float) by ``inferer`` with the head's guidance towards
    ``target`` (per finding: 0 remove, 1 induce, NaN leave), batch by batch; the head reads the empty prompt's context
    ``empty``, the denoiser ``conditioning`` against the unconditional context of :func:`_guidance_contexts`."""
    parts = []
    for start in range(0, len(images), batch_size):
        batch_target = target[start : start + batch_size].to(device)
        hook = ClassifierGuidanceHook.from_joint(
            network, inferer.scheduler, batch_target, classifier_context=empty,
            guidance_scale=guidance_scale, through_denoiser=through_denoiser,
        )  # fmt: skip
        uncond = _guidance_contexts(text_encoder, batch_target, empty, label_names, finding_phrases, template)
        batch = images[start : start + batch_size].to(device)
        parts.append(inferer(batch, network, autoencoder, conditioning, uncond, hooks=[hook]).float().cpu())
    return torch.cat(parts)


def explain_predictions(
    inferer: CounterfactualInferer,
    network: JointDiffusionUNet,
    autoencoder: torch.nn.Module,
    text_encoder: Any,
    inputs: Mapping[str, Any],
    output_dir: str | os.PathLike,
    *,
    scale_factor: float,
    label_names: Sequence[str],
    guidance_scale: float = 100.0,
    prompt: str = "",
    finding_phrases: Mapping[str, str] | None = None,
    negative_prompt_template: str = "{findings}",
    decision_threshold: float = 0.5,
    through_denoiser: bool = False,
    difference: DifferenceMap | None = None,
    settings: Mapping[str, Any] | None = None,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    preprocessing: Any = None,
) -> dict[str, Any]:
    """Explain the head's predictions: for each image, the probabilities; every finding predicted
    (``p > decision_threshold``) is removed with ``inferer`` (a :class:`~monai_cfx.inferers.CounterfactualInferer`)
    plus :meth:`ClassifierGuidanceHook.from_joint <monai_cfx.inferers.ClassifierGuidanceHook.from_joint>` (targets 0
    for the predicted findings, NaN for the others; the classifier reads the empty prompt's context, as it was
    trained). The denoiser is conditioned on ``prompt`` (default the empty prompt: the finding is removed by the
    classifier alone); the inversion runs under the empty prompt. With ``finding_phrases``, each image's negative
    prompt (:func:`removal_prompts` with ``negative_prompt_template``) names the findings it removes: the inversion
    runs under it and the inferer's classifier-free guidance pushes from it towards ``prompt``, so only the predicted
    findings are pushed out. An image with no predicted finding gets the inversion's reconstruction (no gradient).

    Writes into ``output_dir``, all together or not at all: ``<name>_counterfactual.nii.gz`` and
    ``<name>_difference.nii.gz`` (signed image minus counterfactual) with the input's affine, ``<name>_panel.png``
    in 2D (image, counterfactual, ``difference``'s map), and ``explanations.json`` with the probabilities before and
    after, the findings removed and the settings. With ``preprocessing`` and ``inputs`` from :func:`load_images`,
    the counterfactual is mapped back onto each scan's own grid (shape, orientation, affine) and the difference is
    the scan (in model intensity units) minus it.

    Args:
        inputs: ``{"images": (N, C, *spatial), "affines": [...], "names": [...], "labels": (N, K) or None}`` and,
            from :func:`load_images`, ``"prepared"`` (each item's record of ``preprocessing``).
        difference: the panel's map (default: absolute, normalised).
        preprocessing: the chain that made ``inputs`` (its inverse maps the outputs back); ``None`` keeps the
            outputs on the model's grid.

    Returns:
        the record written to ``explanations.json``.
    """
    images, affines, names = inputs["images"], inputs["affines"], list(inputs["names"])
    if not len(images) == len(affines) == len(names):
        raise ValueError(f"give one affine and name per image ({len(images)}), got {len(affines)} and {len(names)}.")
    difference = difference or DifferenceMap(mode="absolute", normalize=True)
    network = network.to(device).eval()
    autoencoder = autoencoder.to(device).eval()
    with torch.no_grad():
        empty = text_encoder.null_context(1).to(device)
        conditioning = text_encoder([prompt]).to(device)
    before = head_probabilities(network, autoencoder, images, scale_factor, empty, batch_size, device)
    counterfactual = _guided_edits(
        inferer, network, autoencoder, text_encoder, images, _removal_target(before, decision_threshold),
        conditioning, empty, guidance_scale=guidance_scale, through_denoiser=through_denoiser,
        label_names=label_names, finding_phrases=finding_phrases, template=negative_prompt_template,
        batch_size=batch_size, device=device,
    )  # fmt: skip
    after = head_probabilities(network, autoencoder, counterfactual, scale_factor, empty, batch_size, device)
    spatial_dims = images.ndim - 2
    records = []
    with atomic_directory(output_dir, overwrite) as folder:
        for index, (name, affine) in enumerate(zip(names, affines)):
            image, edited = images[index].float().cpu(), counterfactual[index]
            if preprocessing is not None and "prepared" in inputs:
                prepared = inputs["prepared"][index]
                edited = to_scan_grid(edited, prepared, preprocessing).as_tensor()
                image = torch.as_tensor(prepared["scan"]).float().cpu()
            removed = [label_names[k] for k in np.flatnonzero(before[index].numpy() > decision_threshold)]
            files = {"counterfactual": f"{name}_counterfactual.nii.gz", "difference": f"{name}_difference.nii.gz"}
            write_nifti(edited.numpy(), affine, folder / files["counterfactual"])
            write_nifti((image - edited).numpy(), affine, folder / files["difference"])
            if spatial_dims == 2:
                files["panel"] = f"{name}_panel.png"
                plot_image_strip(
                    torch.stack([image.clamp(0, 1), edited.clamp(0, 1), torch.as_tensor(difference(image, edited))]),
                    ["image", "counterfactual", "difference"],
                    folder / files["panel"],
                    suptitle=f"{name}: removed {', '.join(removed) or 'nothing'}",
                )
            record: dict[str, Any] = {
                "name": name,
                "files": files,
                "probabilities_before": dict(zip(label_names, before[index].tolist())),
                "probabilities_after": dict(zip(label_names, after[index].tolist())),
                "removed": removed,
            }
            labels = inputs.get("labels")
            if labels is not None:
                record["labels"] = dict(zip(label_names, [float(v) for v in labels[index]]))
            records.append(record)
        manifest = {"settings": dict(settings or {}), "label_names": list(label_names), "items": records}
        write_json(manifest, folder / "explanations.json")
    return manifest


def load_phantom_items(
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    data_list_key: str,
    num_items: int | None = None,
    keys: Sequence[str] = ("image", "healthy", "mask"),
) -> dict[str, Any]:
    """The abnormal items of a phantom datalist (the first ``num_items``) with their healthy twins, finding masks
    and labels, as written (the phantoms are at the model's size, in its intensity range): ``{key: (N, 1,
    *spatial)} | {"label": (N, K)}``.

    Raises:
        ValueError: when no item has a finding, or an item lacks one of ``keys`` or its label.
    """
    from monai.transforms import EnsureChannelFirst, LoadImage

    from monai_cfx.apps.bundle_io import load_datalist

    items = load_datalist(datalist, data_list_key, dataset_dir, path_keys=list(keys), text_keys=())
    abnormal = [item for item in items if "label" in item and sum(item["label"]) > 0][:num_items]
    if not abnormal:
        raise ValueError(f"datalist {str(datalist)!r} has no {data_list_key!r} item with a finding to remove.")
    missing = sorted({key for item in abnormal for key in keys if key not in item})
    if missing:
        raise ValueError(f"datalist {str(datalist)!r}: the {data_list_key!r} items lack {missing}.")
    loader, channel_first = LoadImage(image_only=True), EnsureChannelFirst()
    loaded = {
        key: torch.stack([torch.as_tensor(channel_first(loader(item[key]))).float() for item in abnormal])
        for key in keys
    }
    loaded["label"] = torch.tensor([item["label"] for item in abnormal], dtype=torch.float32)
    return loaded


def evaluate_counterfactuals(
    inferer: CounterfactualInferer,
    network: JointDiffusionUNet,
    autoencoder: torch.nn.Module,
    text_encoder: Any,
    oracle: torch.nn.Module,
    data: Mapping[str, torch.Tensor],
    *,
    scale_factor: float,
    label_names: Sequence[str],
    guidance_scales: Sequence[float],
    difference: DifferenceMap | None = None,
    through_denoiser: bool = False,
    prompt: str = "",
    finding_phrases: Mapping[str, str] | None = None,
    negative_prompt_template: str = "{findings}",
    threshold: float = 0.5,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Classifier-guided counterfactuals that remove every finding an image has, measured against what the
    phantoms know, for each guidance scale of ``guidance_scales`` (0: the same inversion and denoising without
    classifier guidance, the baseline). ``prompt``, ``finding_phrases`` and ``negative_prompt_template`` condition
    the denoiser as in :func:`explain_predictions` (the negative prompts name every finding the image has).

    Per scale, averaged over the images (``data`` from :func:`load_phantom_items`):

    - ``validity``: the *oracle*, an independent classifier, sees none of the image's findings (p < ``threshold``);
      ``head_validity``: the joint head does not either;
    - ``adversarial``: the head flips (it saw one of the image's findings before the edit and sees none after) but
      the oracle still sees one (a change that fools the head only), as a fraction of all images and of the images
      whose head flipped (``adversarial_among_head_flips``); ``head_flips``: the fraction that flipped;
    - ``localization_auroc`` of ``difference`` (default: absolute, Gaussian sigma 1.5, as the counterfactual
      bundle's) against the finding mask; ``twin_l1_outside`` / ``twin_l1_inside``: mean |counterfactual - healthy
      twin| outside / inside the finding; ``l1_outside``, ``ssim`` and the other measures of
      :class:`~monai_cfx.handlers.CounterfactualMetricsHandler`;
    - the cost: ``unet_evaluations_per_image`` (image rows through the UNet, for denoising or for the head's
      features; each guided step's head pass is also back-propagated) and ``seconds_per_image`` of the edits.

    Returns:
        ``{"num_images", "label_names", "sweep": {scale: {measure: value}}}``.
    """
    from monai_cfx.handlers import CounterfactualMetricsHandler

    difference = difference or DifferenceMap(mode="absolute", sigma=1.5, normalize=True)
    images, labels = data["image"].float(), data["label"].float()
    present = labels > 0.5
    spatial_dims = images.ndim - 2
    measure = CounterfactualMetricsHandler(oracle.to(device).eval(), spatial_dims=spatial_dims, threshold=threshold)
    network, autoencoder = network.to(device).eval(), autoencoder.to(device).eval()
    with torch.no_grad():
        empty = text_encoder.null_context(1).to(device)
        conditioning = text_encoder([prompt]).to(device)
    target = torch.where(present, torch.zeros_like(labels), torch.full_like(labels, math.nan))
    head_before = head_probabilities(network, autoencoder, images, scale_factor, empty, batch_size, device)
    head_saw = ((head_before >= threshold) & present).any(dim=1)
    sweep: dict[str, Any] = {}
    passes = [0]  # image rows through the UNet (denoising, or the head's features) during the edits

    def count(module: torch.nn.Module, args: tuple) -> None:
        passes[0] += int(args[0].shape[0])

    for scale in guidance_scales:
        passes[0], started = 0, time.perf_counter()
        counter = network.conv_in.register_forward_pre_hook(count)
        counterfactual = _guided_edits(
            inferer, network, autoencoder, text_encoder, images, target, conditioning, empty,
            guidance_scale=float(scale), through_denoiser=through_denoiser, label_names=label_names,
            finding_phrases=finding_phrases, template=negative_prompt_template, batch_size=batch_size, device=device,
        )  # fmt: skip
        counter.remove()
        seconds = time.perf_counter() - started
        head_after = head_probabilities(network, autoencoder, counterfactual, scale_factor, empty, batch_size, device)
        items = [
            {
                "image": images[i],
                "pred": counterfactual[i],
                "difference": torch.as_tensor(difference(images[i], counterfactual[i])),
                "mask": data["mask"][i],
                "label": labels[i],
                "healthy": data["healthy"][i],
            }
            for i in range(len(images))
        ]
        values = measure.compute(items)
        head_valid = ~((head_after >= threshold) & present).any(dim=1)
        flipped = head_saw & head_valid
        oracle_valid = values["validity"] > 0.5
        fooled = flipped & ~oracle_valid
        row = {name: float(np.nanmean(value.numpy())) for name, value in values.items()}
        row["head_validity"] = float(head_valid.float().mean())
        row["head_flips"] = float(flipped.float().mean())
        row["adversarial"] = float(fooled.float().mean())
        row["adversarial_among_head_flips"] = float(fooled.sum() / flipped.sum()) if flipped.any() else math.nan
        row["validity_per_finding"] = {
            name: float(oracle_valid[present[:, k]].float().mean()) if present[:, k].any() else math.nan
            for k, name in enumerate(label_names)
        }
        # cost: UNet image-evaluations per image (each guided step adds the head's pass and its backward)
        row["unet_evaluations_per_image"] = passes[0] / len(images)
        row["seconds_per_image"] = seconds / len(images)
        sweep[f"{float(scale):g}"] = row
        logger.info(f"guidance scale {scale:g}: " + ", ".join(
            f"{key} {row[key]:.3f}" for key in ("validity", "head_validity", "localization_auroc", "twin_l1_outside")
        ))  # fmt: skip
    return {"num_images": int(len(images)), "label_names": list(label_names), "sweep": sweep}


def evaluate_targeted_removal(
    inferer: CounterfactualInferer,
    network: JointDiffusionUNet,
    autoencoder: torch.nn.Module,
    text_encoder: Any,
    oracle: torch.nn.Module,
    data: Mapping[str, torch.Tensor],
    *,
    scale_factor: float,
    label_names: Sequence[str],
    guidance_scale: float,
    prompt: str = "",
    finding_phrases: Mapping[str, str] | None = None,
    negative_prompt_template: str = "{findings}",
    threshold: float = 0.5,
    through_denoiser: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Remove one finding and keep the others: of the images of ``data`` (:func:`load_phantom_items`) with two or
    more findings, each has one of them, drawn with ``seed``, targeted for removal (0) and the others left alone
    (NaN), with the same conditioning as :func:`evaluate_counterfactuals` (with ``finding_phrases`` the negative
    prompt names the chosen finding only). A healthy ``prompt`` removes the findings that are not targeted as well,
    which :func:`evaluate_counterfactuals` cannot see; this measure does.

    Returns:
        ``{"num_images", "label_names", "removed", "others_kept", "removed_and_kept", "head_removed",
        "head_others_kept", "removed_per_finding", "chosen"}``: ``removed`` is the fraction of images whose chosen
        finding the *oracle* no longer sees (p < ``threshold``), ``others_kept`` the fraction where it still sees
        every other finding the image has, ``removed_and_kept`` both; ``head_*`` the same by the joint head.

    Raises:
        ValueError: when no image has two findings, or ``guidance_scale`` is not finite.
    """
    if not math.isfinite(float(guidance_scale)):
        raise ValueError(f"`guidance_scale` must be finite, got {guidance_scale}.")
    labels = data["label"].float()
    several = torch.nonzero((labels > 0.5).sum(dim=1) >= 2).flatten()
    if len(several) == 0:
        raise ValueError("targeted removal needs images with two or more findings; `data` has none.")
    images, labels = data["image"][several].float(), labels[several]
    present = labels > 0.5
    generator = np.random.default_rng(seed)
    chosen = torch.tensor([int(generator.choice(np.flatnonzero(row.numpy()))) for row in present])
    chosen_mask = torch.nn.functional.one_hot(chosen, len(label_names)).bool()
    target = torch.where(chosen_mask, torch.zeros_like(labels), torch.full_like(labels, math.nan))
    network, autoencoder = network.to(device).eval(), autoencoder.to(device).eval()
    with torch.no_grad():
        empty = text_encoder.null_context(1).to(device)
        conditioning = text_encoder([prompt]).to(device)
    counterfactual = _guided_edits(
        inferer, network, autoencoder, text_encoder, images, target, conditioning, empty,
        guidance_scale=guidance_scale, through_denoiser=through_denoiser, label_names=label_names,
        finding_phrases=finding_phrases, template=negative_prompt_template, batch_size=batch_size, device=device,
    )  # fmt: skip
    others = present & ~chosen_mask
    record: dict[str, Any] = {"num_images": int(len(images)), "label_names": list(label_names)}
    readers = {
        "": oracle_predict(oracle, counterfactual, batch_size, device)[0],
        "head_": head_probabilities(network, autoencoder, counterfactual, scale_factor, empty, batch_size, device),
    }
    for prefix, probabilities in readers.items():
        seen = probabilities >= threshold
        removed = ~seen[chosen_mask]
        kept = (seen | ~others).all(dim=1)
        record[f"{prefix}removed"] = float(removed.float().mean())
        record[f"{prefix}others_kept"] = float(kept.float().mean())
        if not prefix:
            record["removed_and_kept"] = float((removed & kept).float().mean())
            record["removed_per_finding"] = {
                name: float(removed[chosen == k].float().mean()) if (chosen == k).any() else math.nan
                for k, name in enumerate(label_names)
            }
    record["chosen"] = [label_names[k] for k in chosen.tolist()]
    logger.info(
        f"targeted removal of {len(images)} images: removed {record['removed']:.3f}, "
        f"others kept {record['others_kept']:.3f} (head: {record['head_removed']:.3f}, "
        f"{record['head_others_kept']:.3f})"
    )
    return record
