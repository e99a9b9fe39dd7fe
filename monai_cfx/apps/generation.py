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
"""Prompt-to-image generation and its evaluation: the mechanisms behind the latent diffusion bundle's
``inference.json`` and ``evaluate.json`` (the configs hold the choices)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import FIDMetric
from monai.metrics.rocauc import compute_roc_auc

from monai_cfx.data import generate_phantom
from monai_cfx.inferers import SamplingHook, TextGuidedLatentDiffusionInferer, sample_prompts
from monai_cfx.metrics import oracle_predict
from monai_cfx.utils import check_option, check_writable, write_json, write_nifti, write_png

__all__ = [
    "evaluate_generator",
    "evaluate_oracle",
    "finding_prompts",
    "generate_images",
    "save_generated",
    "stack_items",
]


def generate_images(
    inferer: TextGuidedLatentDiffusionInferer,
    autoencoder: torch.nn.Module,
    diffusion: torch.nn.Module,
    text_encoder: Any,
    prompts: Sequence[str],
    seeds: Sequence[int] | None = None,
    *,
    latent_shape: Sequence[int],
    guidance_scale: float = 3.0,
    num_inference_steps: int = 50,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    verbose: bool = False,
    hooks: Sequence[SamplingHook] = (),
) -> torch.Tensor:
    """Sample one image per prompt with classifier-free guidance; image ``i`` is reproducible from ``seeds[i]``
    (:func:`~monai_cfx.inferers.sample_prompts` with ``inferer.sample``; ``hooks`` go to every step).

    Returns:
        images ``(N, C, *spatial)`` clipped to [0, 1], on the CPU.
    """
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    autoencoder, diffusion = autoencoder.to(device).eval(), diffusion.to(device).eval()
    inferer.scheduler.set_timesteps(num_inference_steps)

    def sample(noise: torch.Tensor, context: torch.Tensor, uncond_context: torch.Tensor) -> torch.Tensor:
        images = inferer.sample(
            noise,
            autoencoder,
            diffusion,
            conditioning=context,
            uncond_conditioning=uncond_context,
            guidance_scale=guidance_scale,
            hooks=hooks,
            verbose=verbose,
        )
        return images.clamp(0, 1).float()

    return sample_prompts(sample, text_encoder, prompts, seeds, latent_shape, batch_size, device)


def save_generated(
    images: torch.Tensor,
    prompts: Sequence[str],
    seeds: Sequence[int],
    output_dir: str | os.PathLike,
    affine: np.ndarray | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Write ``sample_XXX.nii.gz`` (and ``.png`` in 2D) plus ``prompts.json``; returns the records.

    Every target is checked before the first write, so an existing file (without ``overwrite``) stops
    the run before anything is written; each file is written atomically.
    """
    if not len(images) == len(prompts) == len(seeds):
        raise ValueError(
            f"got {len(images)} images, {len(prompts)} prompts and {len(seeds)} seeds; expected equal counts."
        )
    output_dir = Path(output_dir)
    spatial_dims = images.ndim - 2
    affine = np.eye(4) if affine is None else np.asarray(affine)
    records = []
    for index, (prompt, seed) in enumerate(zip(prompts, seeds)):
        record = {"prompt": prompt, "seed": int(seed), "image": f"sample_{index:03d}.nii.gz"}
        if spatial_dims == 2:
            record["png"] = f"sample_{index:03d}.png"
        records.append(record)
    targets = [output_dir / name for r in records for key, name in r.items() if key in ("image", "png")]
    for target in [*targets, output_dir / "prompts.json"]:
        check_writable(target, overwrite)
    for image, record in zip(images.numpy(), records):
        write_nifti(image, affine, output_dir / record["image"], overwrite=overwrite)
        if "png" in record:
            write_png(image, output_dir / record["png"], overwrite=overwrite)
    write_json(records, output_dir / "prompts.json", overwrite=overwrite)
    return records


def finding_prompts(
    kind: str, label_names: Sequence[str], per_finding: int, seed: int = 10_000, size: int | None = None
) -> dict[str, list[str]]:
    """Held-out report sentences per finding (single-finding subjects) and for normal subjects.

    The phrasing varies with side, zone and size as the phantoms' reports do, so fidelity is measured
    over the prompt distribution, not one hand-picked sentence.
    """
    prompts: dict[str, list[str]] = {name: [] for name in (*label_names, "normal")}
    for name in prompts:
        findings = [] if name == "normal" else [name]
        prompts[name] = [
            generate_phantom(kind, seed + i, size=32 if kind == "brain" else 64, findings=findings)["report"]
            for i in range(per_finding)
        ]
    return prompts


def evaluate_oracle(
    oracle: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    label_names: Sequence[str],
    output_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Per-finding AUROC of the oracle on labelled images; written to ``output_path`` (JSON) if given."""
    probabilities, _ = oracle_predict(oracle, images, device=device)
    aurocs = compute_roc_auc(probabilities, labels.float(), average="none")
    aurocs = [float(a) for a in np.atleast_1d(np.asarray(aurocs))]
    metrics = {
        "num_images": int(len(images)),
        "auroc": dict(zip(label_names, aurocs)),
        "auroc_macro": float(np.mean(aurocs)),
        "accuracy_at_0.5": dict(zip(label_names, ((probabilities > 0.5) == (labels > 0.5)).float().mean(0).tolist())),
    }
    if output_path is not None:
        write_json(metrics, output_path, overwrite=overwrite)
    return metrics


def evaluate_generator(
    generate: Any,
    oracle: torch.nn.Module,
    reference_images: torch.Tensor,
    reference_prompts: Sequence[str],
    kind: str,
    label_names: Sequence[str],
    samples_per_prompt_class: int = 16,
    second_reference_images: torch.Tensor | None = None,
    output_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prompt fidelity and FID of a text-to-image generator, judged by the oracle.

    Fidelity: for each finding, ``samples_per_prompt_class`` held-out single-finding reports are used as
    prompts, and fidelity is the fraction of those samples in which the oracle sees the finding
    (p > 0.5); for normal reports it is the fraction in which the oracle sees no finding.

    FID: one sample per held-out subject, prompted with that subject's report, against the held-out
    images themselves (oracle embeddings), so both sets share the finding mix. With
    ``second_reference_images`` (e.g. the validation split), the FID between the two real sets is
    reported as the floor that finite samples alone give.

    Args:
        generate: callable ``(prompts, seeds) -> images`` (e.g. ``functools.partial(generate_images, ...)``).
        reference_prompts: the reports of ``reference_images``, one per image.
    """
    check_option("kind", kind, ("chest", "brain"))
    if len(reference_prompts) != len(reference_images):
        raise ValueError(
            f"`reference_prompts` must have one report per reference image ({len(reference_images)}), "
            f"got {len(reference_prompts)}."
        )
    label_names = list(label_names)
    fidelity = {}
    for class_index, (name, class_prompts) in enumerate(
        finding_prompts(kind, label_names, samples_per_prompt_class).items()
    ):
        seeds = [1000 * (class_index + 1) + i for i in range(len(class_prompts))]
        probabilities, _ = oracle_predict(oracle, generate(class_prompts, seeds), device=device)
        if name == "normal":
            fidelity[name] = float((probabilities < 0.5).all(dim=1).float().mean())
        else:
            fidelity[name] = float((probabilities[:, label_names.index(name)] > 0.5).float().mean())
    generated = generate(list(reference_prompts), list(range(len(reference_prompts))))
    _, generated_embeddings = oracle_predict(oracle, generated, device=device)
    _, reference_embeddings = oracle_predict(oracle, reference_images, device=device)
    metrics: dict[str, Any] = {
        "prompt_fidelity": fidelity,
        "fid_oracle_features": float(FIDMetric()(generated_embeddings.double(), reference_embeddings.double())),
        "samples_per_prompt_class": samples_per_prompt_class,
        "num_reference_images": int(len(reference_images)),
    }
    if second_reference_images is not None:
        _, second_embeddings = oracle_predict(oracle, second_reference_images, device=device)
        metrics["fid_real_vs_real"] = float(FIDMetric()(second_embeddings.double(), reference_embeddings.double()))
    if output_path is not None:
        write_json(metrics, output_path, overwrite=overwrite)
    return metrics


def stack_items(items: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor:
    """Stack one key of a list of item dicts (e.g. a loaded datalist) into a batch tensor."""
    return torch.stack([torch.as_tensor(item[key], dtype=torch.float32) for item in items])
