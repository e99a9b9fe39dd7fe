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
"""Semi-supervised joint diffusion and classification training (Mediffusion, Kaleta et al., arXiv 2411.09434) with
MONAI's ``SupervisedTrainer``.

One :class:`~monai_cfx.networks.nets.JointDiffusionUNet` learns to denoise on every image and to classify on the
labelled ones. The pieces, each in the place MONAI would put it:

- :func:`labelled_split` picks the labelled subset of a training datalist (seeded, stratified per finding) and
  :func:`mark_labelled` writes the split into the datalist: every item gets a ``labelled`` flag (1 or 0) and the
  unlabelled items' labels are hidden (NaN), so a label that must not be used cannot be used silently;
- :class:`LabelledBatchSampler` (a DataLoader ``batch_sampler``) puts a fixed number of labelled and unlabelled
  items in every batch (FixMatch's ratio μ), cycling the few labelled ones;
- :class:`JointDiffusionPrepareBatch` draws latents, noise, timesteps and prompt contexts as
  :class:`~monai_cfx.engines.LatentDiffusionPrepareBatch` does, and adds the labels, the ``labelled`` mask and the
  report-free context the classifier reads;
- :class:`JointDiffusionInferer` runs the denoiser on the noisy latent and the classifier on the clean latent at
  ``t = 0`` (and, for DiffMatch, on a strong view of the unlabelled rows: :class:`StrongLatentAugment`);
- :class:`JointDiffusionLoss` adds the diffusion MSE on all rows, the BCE on the labelled rows and, optionally,
  :class:`DiffMatchLoss` (FixMatch's confident pseudo-labels on the unlabelled rows), and keeps its terms for logging.

Differences from the reference code (``pskiers/Joint-Diffusion-in-Latent-Space``): the classifier is trained and used
at ``t = 0`` only; the head is an ordinary part of the network, so ``network.parameters()`` gives it to the optimiser;
labelled rows are known from each item's flag, not sliced off the batch by a configured count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import Scheduler
from torch.utils.data import Sampler

from monai_cfx.utils import check_option

from .latent_diffusion import LatentDiffusionPrepareBatch

__all__ = [
    "CLASSIFIER_LATENTS",
    "DiffMatchLoss",
    "JointDiffusionInferer",
    "JointDiffusionLoss",
    "JointDiffusionPrepareBatch",
    "LabelledBatchSampler",
    "StrongLatentAugment",
    "labelled_split",
    "mark_labelled",
]

# which latent the classification branch reads: the posterior sample the diffusion branch noises, or its mean
CLASSIFIER_LATENTS = ("sample", "mean")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
    return float(value)


# ------------------------------------------------------------------------------------------------ the labelled split


def _label_matrix(items: Sequence[Any], label_key: str) -> np.ndarray:
    """``(N, K)`` boolean positives of the items' label vectors (a mapping's ``label_key``, or the item itself)."""
    if len(items) == 0:
        raise ValueError("`items` must hold at least one item, got none.")
    rows = []
    for index, item in enumerate(items):
        if isinstance(item, Mapping):
            if label_key not in item:
                raise ValueError(
                    f"item {index} of `items` has no {label_key!r} key (`label_key`), keys {sorted(item)}."
                )
            item = item[label_key]
        row = np.atleast_1d(np.asarray(item, dtype=float))
        if row.ndim != 1 or (rows and row.shape != rows[0].shape):
            raise ValueError(
                f"`items` must carry label vectors of one length: item 0 has {rows[0].shape if rows else row.shape} "
                f"findings, item {index} has shape {row.shape}."
            )
        rows.append(row)
    return np.stack(rows) > 0.5


def labelled_split(
    items: Sequence[Any],
    labelled_fraction: float,
    seed: int = 0,
    label_key: str = "label",
    label_names: Sequence[str] | None = None,
) -> tuple[list[int], list[int]]:
    """Seeded split of a training set into a labelled and an unlabelled part, stratified per finding, for
    semi-supervised training (Mediffusion, Kaleta et al. 2024, arXiv 2411.09434, sec. 4: a fraction of the training
    labels is kept).

    ``round(labelled_fraction * N)`` items (at least one) are labelled. Normal items (all-zero labels) are a stratum of
    their own. The split runs in two passes:

    1. coverage: for every finding present in the data, rarest first, one of its positives is labelled unless a
       labelled item already has it (the positive that also covers most other uncovered findings);
    2. iterative stratification (Sechidis et al. 2011, ECML PKDD) of the other items: the finding (or the normal
       stratum) with the fewest unassigned items goes first; each of its items, in seeded random order, joins the part
       that still wants most of that finding (``labelled_fraction`` of its positives for the labelled part), then the
       part with most room. Part sizes are exact, and each finding's labelled share is close to the fraction.

    Args:
        items: the training items: mappings with ``label_key`` (a datalist) or the label vectors themselves; a label
            vector is multi-hot (``> 0.5`` is a positive), one entry per finding.
        labelled_fraction: share of labelled items, in (0, 1].
        seed: seed of the split.
        label_key: key of the label vector in a mapping item.
        label_names: names of the findings, for error messages.

    Returns:
        ``(labelled_indices, unlabelled_indices)``, sorted indices into ``items``.

    Raises:
        ValueError: for a ``labelled_fraction`` outside (0, 1]; label vectors of different lengths (naming the item);
            a fraction too small to keep a labelled positive of every finding present (naming the finding).

    Example::

        datalist = monai.data.load_decathlon_datalist("datalist.json", True, "training")
        labelled, unlabelled = labelled_split(datalist, 0.05, seed=0)
        dataset = CacheDataset(mark_labelled(datalist, labelled), transform)
    """
    valid = isinstance(labelled_fraction, Real) and not isinstance(labelled_fraction, bool)
    if not valid or not 0.0 < labelled_fraction <= 1.0:
        raise ValueError(f"`labelled_fraction` must be in (0, 1], got {labelled_fraction!r}.")
    positives = _label_matrix(items, label_key)
    num_items, num_findings = positives.shape
    fraction = float(labelled_fraction)
    num_labelled = max(1, math.floor(fraction * num_items + 0.5))
    # the normal items are a stratum of their own: one more column
    strata = np.concatenate([positives, ~positives.any(axis=1, keepdims=True)], axis=1)
    counts = strata.sum(axis=0)
    rng = np.random.default_rng(seed)
    rank = np.empty(num_items, dtype=np.int64)
    rank[rng.permutation(num_items)] = np.arange(num_items)  # seeded tie-breaking order
    labelled = np.zeros(num_items, dtype=bool)

    def name(finding: int) -> str:
        return repr(label_names[finding]) if label_names is not None else f"index {finding}"

    # 1. coverage: one labelled positive of every finding present in the data, rarest finding first
    for finding in sorted(np.flatnonzero(counts[:num_findings]), key=lambda j: (counts[j], j)):
        if (positives[labelled, finding]).any():
            continue
        if labelled.sum() >= num_labelled:
            raise ValueError(
                f"`labelled_fraction` {labelled_fraction!r} labels {num_labelled} of {num_items} items, too few to "
                f"keep a labelled positive of every finding: finding {name(finding)} ({counts[finding]} positives) "
                "gets none. Raise `labelled_fraction`."
            )
        candidates = np.flatnonzero(positives[:, finding] & ~labelled)
        uncovered = ~positives[labelled].any(axis=0)
        gain = positives[candidates][:, uncovered].sum(axis=1)
        labelled[candidates[np.lexsort((rank[candidates], -gain))[0]]] = True  # most new findings, then seeded

    # 2. iterative stratification of the rest into the two parts, with exact sizes
    wanted = np.stack([fraction * counts - strata[labelled].sum(axis=0), (1.0 - fraction) * counts])
    room = np.array([num_labelled - labelled.sum(), num_items - num_labelled], dtype=float)
    unassigned = ~labelled
    while unassigned.any():
        remaining = strata[unassigned].sum(axis=0)
        column = min(np.flatnonzero(remaining), key=lambda c: (remaining[c], c))
        for item in sorted(np.flatnonzero(unassigned & strata[:, column]), key=lambda i: rank[i]):
            if room[0] <= 0 or room[1] <= 0:
                part = int(room[0] <= 0)
            elif wanted[0, column] != wanted[1, column]:
                part = int(wanted[1, column] > wanted[0, column])
            elif room[0] != room[1]:
                part = int(room[1] > room[0])
            else:
                part = int(rng.integers(2))
            labelled[item] = part == 0
            wanted[part] -= strata[item]
            room[part] -= 1
            unassigned[item] = False
    return np.flatnonzero(labelled).tolist(), np.flatnonzero(~labelled).tolist()


def mark_labelled(
    items: Sequence[Mapping[str, Any]],
    labelled_indices: Sequence[int],
    labelled_key: str = "labelled",
    label_key: str = "label",
    hide_labels: bool = True,
) -> list[dict[str, Any]]:
    """Copies of the datalist ``items`` with the split written in: ``labelled_key`` is 1 for the items of
    ``labelled_indices`` and 0 for the others, whose ``label_key`` values are replaced by NaN (``hide_labels``), so
    the labels of the unlabelled part cannot reach a loss unnoticed.

    This is how :class:`JointDiffusionPrepareBatch` learns which rows are labelled: the flag is an ordinary item key
    that every MONAI dataset, cache and collate carries, whatever the sampler.

    Example::

        labelled, unlabelled = labelled_split(datalist, 0.1)
        dataset = CacheDataset(mark_labelled(datalist, labelled), transform)

    Raises:
        ValueError: for an index outside ``items``.
    """
    chosen = {int(i) for i in labelled_indices}
    outside = sorted(i for i in chosen if not 0 <= i < len(items))
    if outside:
        raise ValueError(f"`labelled_indices` must index `items` (0..{len(items) - 1}), got {outside[:5]}.")
    marked = []
    for index, item in enumerate(items):
        item = dict(item)
        item[labelled_key] = int(index in chosen)
        if hide_labels and index not in chosen and label_key in item:
            label = item[label_key]
            hidden = np.full(np.shape(label), np.nan)
            if isinstance(label, torch.Tensor):
                item[label_key] = torch.as_tensor(
                    hidden, dtype=label.dtype if label.is_floating_point() else torch.float32
                )
            elif isinstance(label, np.ndarray):
                item[label_key] = hidden
            else:
                item[label_key] = hidden.tolist()
        marked.append(item)
    return marked


# --------------------------------------------------------------------------------------------------------- sampler


class LabelledBatchSampler(Sampler[list[int]]):
    """Batches of ``labelled_per_batch`` labelled and ``unlabelled_per_batch`` unlabelled dataset indices, for a
    DataLoader's ``batch_sampler`` (FixMatch, Sohn et al. 2020: μ = unlabelled / labelled per batch; Mediffusion
    trains its joint model on such mixed batches).

    An epoch is one pass over the unlabelled indices in a new seeded order: ``len(sampler)`` is
    ``len(unlabelled_indices) // unlabelled_per_batch`` batches (the remainder, different each epoch, waits for the
    next one). The labelled indices are few, so they are cycled: a new seeded permutation each time they run out.
    With ``unlabelled_per_batch=0`` (fully supervised) an epoch is one pass over the labelled indices.

    The order of epoch ``e`` depends only on ``seed + e``, as in ``torch.utils.data.DistributedSampler``:
    :meth:`set_epoch` chooses ``e``; each new iteration otherwise moves on to the next epoch, so a sampler that
    nobody calls ``set_epoch`` on still reshuffles. In a distributed run (``num_replicas`` > 1) every process draws
    the same batches of the epoch and keeps those of its ``rank`` (``rank, rank + num_replicas, ...``), the same
    number in every process: the processes see different items at each step.

    Args:
        labelled_indices: dataset indices of labelled items (:func:`labelled_split`).
        unlabelled_indices: dataset indices of unlabelled items.
        labelled_per_batch: labelled items per batch, >= 1.
        unlabelled_per_batch: unlabelled items per batch, >= 0.
        seed: base seed of the orders.
        num_replicas: processes sharing the batches (1: this one takes them all).
        rank: this process's rank among them.

    Raises:
        ValueError: for counts that are not ints, an index in both lists, no labelled index, fewer unlabelled
            indices than ``unlabelled_per_batch``, a ``rank`` outside ``[0, num_replicas)``, or fewer batches in an
            epoch than processes.

    Example::

        sampler = LabelledBatchSampler(labelled, unlabelled, labelled_per_batch=4, unlabelled_per_batch=28, seed=0)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4)
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: sampler.set_epoch(engine.state.epoch - 1))
    """

    def __init__(
        self,
        labelled_indices: Sequence[int],
        unlabelled_indices: Sequence[int],
        labelled_per_batch: int,
        unlabelled_per_batch: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"`rank` must be below `num_replicas` ({self.num_replicas}), got {self.rank}.")
        self.labelled_per_batch = _check_int("labelled_per_batch", labelled_per_batch, 1)
        self.unlabelled_per_batch = _check_int("unlabelled_per_batch", unlabelled_per_batch, 0)
        self.labelled_indices = [int(i) for i in labelled_indices]
        self.unlabelled_indices = [int(i) for i in unlabelled_indices]
        if not self.labelled_indices:
            raise ValueError("`labelled_indices` must hold at least one index, got none.")
        both = sorted(set(self.labelled_indices) & set(self.unlabelled_indices))
        if both:
            raise ValueError(f"an index cannot be labelled and unlabelled: {both[:5]} are in both lists.")
        if self.unlabelled_per_batch and len(self.unlabelled_indices) < self.unlabelled_per_batch:
            raise ValueError(
                f"`unlabelled_per_batch` ({self.unlabelled_per_batch}) must not exceed the number of unlabelled "
                f"indices ({len(self.unlabelled_indices)})."
            )
        self.seed = int(seed)
        self.epoch = 0
        if self.num_replicas > 1 and len(self) == 0:
            raise ValueError(f"an epoch of {self._num_batches()} batches cannot be shared by {self.num_replicas} "
                             "processes: give fewer processes or smaller batches.")  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` for the next iteration."""
        self.epoch = int(epoch)

    def _num_batches(self) -> int:
        """The batches of an epoch, over all processes."""
        if self.unlabelled_per_batch == 0:
            return len(self.labelled_indices) // self.labelled_per_batch
        return len(self.unlabelled_indices) // self.unlabelled_per_batch

    def __len__(self) -> int:
        return self._num_batches() // self.num_replicas

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        num_batches = self._num_batches()
        kept = set(range(self.rank, len(self) * self.num_replicas, self.num_replicas))
        unlabelled = [
            self.unlabelled_indices[i] for i in torch.randperm(len(self.unlabelled_indices), generator=generator)
        ]
        needed = num_batches * self.labelled_per_batch
        labelled: list[int] = []
        while len(labelled) < needed:
            order = torch.randperm(len(self.labelled_indices), generator=generator).tolist()
            labelled.extend(self.labelled_indices[i] for i in order)
        for batch in range(num_batches):
            if batch not in kept:
                continue
            lab = labelled[batch * self.labelled_per_batch : (batch + 1) * self.labelled_per_batch]
            unl = unlabelled[batch * self.unlabelled_per_batch : (batch + 1) * self.unlabelled_per_batch]
            yield lab + unl


# ----------------------------------------------------------------------------------------------------- prepare batch


class JointDiffusionPrepareBatch(LatentDiffusionPrepareBatch):
    """``prepare_batch`` of semi-supervised joint diffusion and classification (Mediffusion, Kaleta et al. 2024,
    arXiv 2411.09434) with MONAI's ``SupervisedTrainer`` and :class:`JointDiffusionInferer`.

    The diffusion branch is :class:`~monai_cfx.engines.LatentDiffusionPrepareBatch`'s (posterior sample, latent
    scaling, noise, timesteps, target, prompt dropout, cached contexts). Added for the classification branch:

    - ``classifier_context``: the context of ``classifier_prompt`` (the empty prompt) for every row. The head never
      reads the report (it names the findings: the label would leak), but a cross-attention UNet needs a context of
      its ``cross_attention_dim``; the empty prompt's is the unconditional one that classifier-free guidance trains,
      and it is the same for every row. Classify with the same context at inference (``classify(z, context=...)``).
    - ``classifier_latent`` (only with ``classifier_latent="mean"``): the scaled posterior mean. By default
      (``"sample"``) the classifier reads the inputs themselves, the posterior sample ``x_0`` that the diffusion
      branch noises, as the reference does: one clean latent for both losses, of the distribution the denoiser models
      and classifier guidance evaluates (through x̂₀); the posterior's small σ is a label-preserving augmentation.
      ``"mean"`` trains on the deterministic encoding instead.
    - ``labelled``: a ``(B,)`` bool mask from the batch's ``labelled_key`` (written by :func:`mark_labelled`); the
      inferer uses it to pick DiffMatch's unlabelled rows. ``labelled_key=None`` marks every row labelled.

    Returns ``(latents, target, (), kwargs)``: ``latents`` the clean scaled latents (the inferer adds the noise, as
    MONAI's ``DiffusionInferer`` does), ``target = {"diffusion", "label", "labelled"}`` for :class:`JointDiffusionLoss`
    (the labels of unlabelled rows pass through untouched and unused), ``kwargs = {"noise", "timesteps",
    "condition", "classifier_context", "labelled"[, "classifier_latent"]}`` for :class:`JointDiffusionInferer`.

    Args:
        autoencoder, text_encoder, num_train_timesteps, scale_factor, scheduler, prediction_type, text_key,
        condition_drop_prob, seed, image_key: as :class:`~monai_cfx.engines.LatentDiffusionPrepareBatch`.
        label_key: batch key of the multi-hot labels ``(B, K)`` (or ``(B,)`` for one finding).
        labelled_key: batch key of the labelled flags; ``None``: every row is labelled.
        classifier_prompt: the prompt whose context the classifier reads (``""``); ``None`` gives it no context (a
            network without cross-attention).
        classifier_latent: ``"sample"`` or ``"mean"`` (:data:`CLASSIFIER_LATENTS`), see above.

    Raises:
        ValueError: for an unknown ``classifier_latent``; at call time, for a batch without labels or flags, or a
            labelled row whose labels are not in [0, 1].

    Example::

        prepare_batch = JointDiffusionPrepareBatch(autoencoder, text_encoder, 1000, scale_factor=scale_factor)
        trainer = SupervisedTrainer(device, max_epochs, loader, unet, torch.optim.AdamW(unet.parameters(), 1e-4),
                                    JointDiffusionLoss(classification_weight=1e-3),
                                    inferer=JointDiffusionInferer(scheduler), prepare_batch=prepare_batch)
    """

    def __init__(
        self,
        *args: Any,
        label_key: str = "label",
        labelled_key: str | None = "labelled",
        classifier_prompt: str | None = "",
        classifier_latent: str = "sample",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.label_key = label_key
        self.labelled_key = labelled_key
        self.classifier_prompt = classifier_prompt
        self.classifier_latent = check_option("classifier_latent", classifier_latent, CLASSIFIER_LATENTS)

    def labels(
        self, batchdata: Mapping[str, Any], batch_size: int, device: Any, non_blocking: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's labels ``(B, K)`` and labelled mask ``(B,)`` (bool), checked."""
        if self.label_key not in batchdata:
            raise ValueError(
                f"the batch has no {self.label_key!r} key (`label_key`) with labels (keys: {sorted(batchdata)})."
            )
        labels = torch.as_tensor(batchdata[self.label_key]).to(device, non_blocking=non_blocking).float()
        labels = labels.reshape(batch_size, -1) if labels.ndim == 1 else labels
        if labels.ndim != 2 or labels.shape[0] != batch_size:
            raise ValueError(
                f"`{self.label_key}` must hold one label vector per image, (B, K) with B = {batch_size}, "
                f"got shape {tuple(labels.shape)}."
            )
        if self.labelled_key is None:
            labelled = torch.ones(batch_size, dtype=torch.bool, device=labels.device)
        elif self.labelled_key not in batchdata:
            raise ValueError(
                f"the batch has no {self.labelled_key!r} key (`labelled_key`) with labelled flags; write them with "
                f"mark_labelled, or set labelled_key=None if every item is labelled (keys: {sorted(batchdata)})."
            )
        else:
            labelled = torch.as_tensor(batchdata[self.labelled_key]).to(labels.device).reshape(-1).bool()
            if labelled.numel() != batch_size:
                raise ValueError(
                    f"`{self.labelled_key}` must hold one flag per image ({batch_size}), got {labelled.numel()}."
                )
        known = labels[labelled]
        if not bool(((known >= 0) & (known <= 1)).all()):
            raise ValueError(
                f"the labelled rows' `{self.label_key}` must be in [0, 1] (multi-hot), got values from "
                f"{float(known.min())} to {float(known.max())} (NaN: a hidden label on a labelled row?)."
            )
        return labels, labelled

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple, dict]:
        images = torch.as_tensor(batchdata[self.image_key]).to(device, non_blocking=non_blocking, **kwargs)
        batch_size = images.shape[0]
        labels, labelled = self.labels(batchdata, batch_size, device, non_blocking)
        classifier_latent = None
        if self.classifier_latent == "mean":
            z_mu, z_sigma = self.posterior(batchdata, images, device, non_blocking)
            with torch.no_grad():
                latents = self.autoencoder.sampling(z_mu, z_sigma) * self.scale_factor
            classifier_latent = z_mu * self.scale_factor
        else:
            latents = self.latents(batchdata, images, device, non_blocking) * self.scale_factor
        prompts = batchdata.get(self.text_key)
        if prompts is None:
            raise ValueError(f"the batch has no {self.text_key!r} key with prompts (keys: {sorted(batchdata)}).")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != batch_size:
            raise ValueError(f"the batch has {batch_size} images but {len(prompts)} prompts in {self.text_key!r}.")
        latents, diffusion_target, args, inferer_kwargs = self.diffusion_batch(latents, prompts, device, non_blocking)
        inferer_kwargs["labelled"] = labelled
        if self.classifier_prompt is not None:
            context = self.text_contexts([self.classifier_prompt] * batch_size)
            inferer_kwargs["classifier_context"] = context.to(device, non_blocking=non_blocking)
        if classifier_latent is not None:
            inferer_kwargs["classifier_latent"] = classifier_latent
        target = {"diffusion": diffusion_target, "label": labels, "labelled": labelled}
        return latents, target, args, inferer_kwargs


# ------------------------------------------------------------------------------------------ inferer and DiffMatch view


class StrongLatentAugment:
    """DiffMatch's strong view of a clean latent: ``(z + noise_std * ε) * m`` with ``ε ~ N(0, I)`` and a feature
    dropout mask ``m`` whose entries are 0 with probability ``feature_dropout`` (1 otherwise, no rescaling: a dropped
    latent entry takes the value 0, the mean of scaled latents).

    FixMatch (Sohn et al. 2020) takes its strong view from RandAugment and Cutout on images; on latents, additive
    Gaussian noise and dropout of latent entries play those parts (our choice: the reference augments images with
    kornia before encoding). Drawn from a seeded CPU ``torch.Generator``, so a run is reproducible on any device.

    Args:
        noise_std: standard deviation of the added noise, in units of the scaled latents (unit variance), >= 0.
        feature_dropout: probability of zeroing a latent entry, in [0, 1).
        seed: seed of the generator.

    Example::

        inferer = JointDiffusionInferer(scheduler, strong_augment=StrongLatentAugment(noise_std=0.3))
    """

    def __init__(self, noise_std: float = 0.3, feature_dropout: float = 0.2, seed: int = 0) -> None:
        self.noise_std = _check_weight("noise_std", noise_std)
        if isinstance(feature_dropout, bool) or not isinstance(feature_dropout, Real) or not 0 <= feature_dropout < 1:
            raise ValueError(f"`feature_dropout` must be a probability in [0, 1), got {feature_dropout!r}.")
        self.feature_dropout = float(feature_dropout)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=self.generator).to(latents)
        keep = (torch.rand(latents.shape, generator=self.generator) >= self.feature_dropout).to(latents)
        return (latents + self.noise_std * noise) * keep


class JointDiffusionInferer(DiffusionInferer):
    """MONAI's ``DiffusionInferer`` for a :class:`~monai_cfx.networks.nets.JointDiffusionUNet`: the training forward
    pass returns ``(noise_prediction, logits)`` (Mediffusion, Kaleta et al. 2024, arXiv 2411.09434).

    ``noise_prediction`` is MONAI's: ``network(add_noise(inputs, noise, t), t, context=condition)``. ``logits`` are
    ``network.classify(clean, context=classifier_context)`` at ``t = 0``, where ``clean`` is ``classifier_latent``
    if given, else ``inputs``: the classifier reads the clean latent, never the noisy one, and never the report.
    With ``strong_augment`` (DiffMatch) it also returns the logits of the strong view of the unlabelled rows
    (``~labelled``), ``(U, K)`` in batch order: ``(noise_prediction, logits, strong_logits)``; both views go
    through the head in one pass (``B + U`` rows). ``sample`` is MONAI's (the network denoises as a plain UNet).

    Args:
        scheduler: the training scheduler (``add_noise``).
        strong_augment: DiffMatch's strong view (:class:`StrongLatentAugment`); ``None`` without DiffMatch.
        classify_only: return the ``logits`` alone, without the denoiser's pass (the head's validation).

    Example::

        inferer = JointDiffusionInferer(DDPMScheduler(1000))
        noise_prediction, logits = inferer(latents, unet, noise=noise, timesteps=timesteps, condition=context)
    """

    def __init__(
        self, scheduler: Scheduler, strong_augment: StrongLatentAugment | None = None, classify_only: bool = False
    ) -> None:
        super().__init__(scheduler)
        if classify_only and strong_augment is not None:
            raise ValueError("`classify_only` runs the head alone; it takes no `strong_augment` (a training view).")
        self.strong_augment = strong_augment
        self.classify_only = classify_only

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "crossattn",
        seg: torch.Tensor | None = None,
        classifier_context: torch.Tensor | None = None,
        classifier_latent: torch.Tensor | None = None,
        labelled: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Args: ``inputs``..``seg`` as MONAI's ``DiffusionInferer``; ``classifier_context`` the report-free context
        of the classifier; ``classifier_latent`` the clean latent it reads (default ``inputs``); ``labelled`` the
        ``(B,)`` mask (needed with ``strong_augment``)."""
        if not callable(getattr(network, "classify", None)):
            raise ValueError(f"`network` must classify (a JointDiffusionUNet), got {type(network).__name__}.")
        if self.strong_augment is not None and labelled is None:
            raise ValueError("with `strong_augment` (DiffMatch) the `labelled` mask is required (the unlabelled rows).")
        clean = inputs if classifier_latent is None else classifier_latent
        if self.classify_only:  # validation of the head: the denoiser's pass would be thrown away
            return network.classify(clean, context=classifier_context)
        noise_prediction = super().__call__(inputs, network, noise, timesteps, condition, mode=mode, seg=seg)
        if self.strong_augment is None or labelled is None:
            return noise_prediction, network.classify(clean, context=classifier_context)
        rows = ~labelled.bool()
        strong = self.strong_augment(clean[rows])
        # one head pass over both views, as FixMatch's reference runs them: a batch-normalised head
        # (classifier_norm="batch") then takes its statistics over one batch, and one unlabelled row is no batch of one
        context = None
        if classifier_context is not None:
            context = torch.cat([classifier_context, classifier_context[rows]])
        logits = network.classify(torch.cat([clean, strong]), context=context)
        return noise_prediction, logits[: len(clean)], logits[len(clean) :]


# ------------------------------------------------------------------------------------------------------------ losses


class DiffMatchLoss(torch.nn.Module):
    """FixMatch's unlabelled loss on latents (DiffMatch in the Mediffusion reference; Sohn et al. 2020, eq. 4) for
    multi-label findings: pseudo-labels from the weak view's sigmoid ``p`` where it is confident (per finding,
    ``p > threshold`` gives 1, ``p < 1 - threshold`` gives 0), BCE of the strong view's logits against them:

    ``weight * mean over unlabelled rows and findings of [confident] * BCE(strong_logits, pseudo_label)``

    (divided by all entries, not the confident ones, as FixMatch does). Pseudo-labels carry no gradient.

    Args:
        threshold: confidence τ, in (0.5, 1).
        weight: λ_u, >= 0.

    Example::

        loss = JointDiffusionLoss(classification_weight=1e-3, diffmatch=DiffMatchLoss(threshold=0.95))
    """

    def __init__(self, threshold: float = 0.95, weight: float = 1.0) -> None:
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0.5 < threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0.5, 1), got {threshold!r}.")
        self.threshold = float(threshold)
        self.weight = _check_weight("weight", weight)
        self.last_confident_fraction = 0.0

    def forward(self, weak_logits: torch.Tensor, strong_logits: torch.Tensor) -> torch.Tensor:
        """Args: ``weak_logits`` and ``strong_logits`` ``(U, K)`` of the same unlabelled rows."""
        if weak_logits.shape != strong_logits.shape:
            raise ValueError(
                f"`weak_logits` {tuple(weak_logits.shape)} and `strong_logits` {tuple(strong_logits.shape)} must be "
                "the logits of the same unlabelled rows."
            )
        if strong_logits.numel() == 0:
            self.last_confident_fraction = 0.0
            return strong_logits.sum() * 0.0
        probabilities = torch.sigmoid(weak_logits.detach().float())
        pseudo_labels = (probabilities > 0.5).float()
        confident = ((probabilities > self.threshold) | (probabilities < 1.0 - self.threshold)).float()
        self.last_confident_fraction = float(confident.mean())
        bce = F.binary_cross_entropy_with_logits(strong_logits.float(), pseudo_labels, reduction="none")
        return self.weight * (confident * bce).mean()


class JointDiffusionLoss(torch.nn.Module):
    """Mediffusion's joint loss (Kaleta et al. 2024, arXiv 2411.09434, eq. 5) for ``SupervisedTrainer``:

    ``diffusion_weight * MSE(noise_prediction, target["diffusion"])`` over all rows
    ``+ classification_weight * BCE(logits, target["label"])`` over the labelled rows (mean over rows and findings;
    0, with a zero gradient, in a batch without labelled rows)
    ``[+ DiffMatchLoss(weak logits of the unlabelled rows, strong_logits)]``.

    Takes ``(prediction, target)`` as the trainer passes them: ``prediction`` from :class:`JointDiffusionInferer`,
    ``target`` from :class:`JointDiffusionPrepareBatch`. ``diffusion_weight=0`` is the classifier-only baseline. A
    term whose weight is 0 is left out of the total (it is still reported). The weak view of DiffMatch is the clean
    latent's ``logits``, detached.

    After each call, :attr:`last_terms` holds the terms as floats: ``diffusion``, ``classification``, ``total`` (and
    ``diffmatch``, ``confident_fraction`` with DiffMatch); :meth:`terms` returns them for a handler's
    ``output_transform``.

    Args:
        classification_weight: weight of the BCE (the reference: 5e-4 to 1e-3), >= 0.
        diffusion_weight: weight of the MSE, >= 0.
        diffmatch: DiffMatch's loss on the unlabelled rows (the inferer needs ``strong_augment``), or ``None``.

    Raises:
        ValueError: for negative weights or both 0; at call time, for a prediction without strong logits when
            ``diffmatch`` is set.

    Example::

        loss_function = JointDiffusionLoss(classification_weight=1e-3)
        trainer = SupervisedTrainer(..., loss_function=loss_function, inferer=JointDiffusionInferer(scheduler),
                                    prepare_batch=JointDiffusionPrepareBatch(autoencoder, text_encoder, 1000))
        # log diffusion / classification / total every iteration
        StatsHandler(name="train", output_transform=loss_function.terms).attach(trainer)
        # or keep them in the engine state for other handlers (TensorBoardStatsHandler reads state.metrics):
        trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                  lambda engine: engine.state.metrics.update(loss_function.last_terms))
    """

    def __init__(
        self,
        classification_weight: float = 1e-3,
        diffusion_weight: float = 1.0,
        diffmatch: DiffMatchLoss | None = None,
    ) -> None:
        super().__init__()
        self.classification_weight = _check_weight("classification_weight", classification_weight)
        self.diffusion_weight = _check_weight("diffusion_weight", diffusion_weight)
        if self.classification_weight == 0 and self.diffusion_weight == 0:
            raise ValueError("`classification_weight` and `diffusion_weight` are both 0: nothing would be trained.")
        self.diffmatch = diffmatch
        self.last_terms: dict[str, float] = {}

    def terms(self, output: Any = None) -> dict[str, float]:
        """The last call's terms (a copy); ``output`` is ignored, so this is an ``output_transform``."""
        return dict(self.last_terms)

    def forward(self, prediction: Sequence[torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        expected = 3 if self.diffmatch is not None else 2
        if not isinstance(prediction, Sequence) or len(prediction) != expected:
            length = len(prediction) if isinstance(prediction, Sequence) else "-"
            raise ValueError(
                f"`prediction` must be the inferer's (noise_prediction, logits{', strong_logits' * (expected == 3)}), "
                f"got {type(prediction).__name__} of length {length}"
                + ("; DiffMatch needs JointDiffusionInferer(strong_augment=...)." if expected == 3 else ".")
            )
        missing = [key for key in ("diffusion", "label", "labelled") if key not in target]
        if missing:
            raise ValueError(
                "`target` must hold 'diffusion', 'label' and 'labelled' (from JointDiffusionPrepareBatch); "
                f"missing {missing}."
            )
        noise_prediction, logits = prediction[0], prediction[1]
        labelled = target["labelled"].to(logits.device).reshape(-1).bool()
        diffusion = F.mse_loss(noise_prediction.float(), target["diffusion"].float())
        if labelled.any():
            labels = target["label"].to(logits.device).float().reshape(logits.shape[0], -1)
            classification = F.binary_cross_entropy_with_logits(logits[labelled].float(), labels[labelled])
        else:
            classification = logits.sum() * 0.0  # a zero with a (zero) gradient, never NaN
        total = logits.new_zeros((), dtype=torch.float32)
        if self.diffusion_weight:
            total = total + self.diffusion_weight * diffusion
        if self.classification_weight:
            total = total + self.classification_weight * classification
        terms = {"diffusion": float(diffusion.detach()), "classification": float(classification.detach())}
        if self.diffmatch is not None:
            consistency = self.diffmatch(logits[~labelled], prediction[2])
            total = total + consistency
            terms["diffmatch"] = float(consistency.detach())
            terms["confident_fraction"] = self.diffmatch.last_confident_fraction
        terms["total"] = float(total.detach())
        self.last_terms = terms
        return total
