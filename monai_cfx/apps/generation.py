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

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import FIDMetric
from monai.metrics.rocauc import compute_roc_auc

from monai_cfx.data import generate_phantom
from monai_cfx.inferers import ClipOriginalSampleHook, SamplingHook, TextGuidedLatentDiffusionInferer, sample_prompts
from monai_cfx.metrics import compute_off_manifold_fraction, oracle_predict
from monai_cfx.networks.utils import reconstruct_mean
from monai_cfx.utils import check_option, check_writable, write_json, write_nifti, write_png

__all__ = [
    "clip_hooks",
    "evaluate_generator",
    "evaluate_oracle",
    "faithful_to_class",
    "fidelity_ceilings",
    "finding_prompts",
    "generate_images",
    "save_generated",
    "stack_items",
]

logger = logging.getLogger(__name__)


def clip_hooks(scheduler: Any, scale_factor_path: str | os.PathLike | None, enabled: bool = True) -> list[SamplingHook]:
    """The sampling hooks that keep the predicted clean latent within the training latents' range
    (:class:`~monai_cfx.inferers.ClipOriginalSampleHook`), read from the ``latent_range`` that diffusion training
    writes into the scale factor file; ``[]`` when not ``enabled``.

    Raises:
        ValueError: ``enabled`` and the file records no ``latent_range`` (weights trained before it was recorded,
            or your own): the message names the file and how to measure or switch it off.
    """
    if not enabled:
        return []
    path = Path(str(scale_factor_path))
    if not path.is_file():
        raise FileNotFoundError(f"scale factor file {str(path)!r} does not exist.")
    latent_range = json.loads(path.read_text()).get("latent_range")
    if not isinstance(latent_range, Mapping) or not {"low", "high"} <= set(latent_range):
        raise ValueError(
            f"scale factor file {str(path)!r} records no `latent_range` ({{'low': [...], 'high': [...]}}, one value "
            "per latent channel) to clip the predicted clean latent to: measure it with "
            "monai_cfx.engines.compute_latent_range on your training images and add it, or run with "
            "--clip_original_sample false."
        )
    return [ClipOriginalSampleHook(scheduler, latent_range["low"], latent_range["high"])]


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


def faithful_to_class(
    probabilities: torch.Tensor, class_name: str, label_names: Sequence[str], exact: bool
) -> torch.Tensor:
    """Per image, whether the oracle's probabilities ``(N, K)`` agree with a prompt class: ``"normal"`` when it sees no
    finding (p < 0.5 for all); a finding when it sees that finding (``exact`` false) or that finding and no other
    (``exact`` true)."""
    seen = probabilities > 0.5
    if class_name == "normal":
        return ~seen.any(dim=1)
    index = list(label_names).index(class_name)
    if not exact:
        return seen[:, index]
    others = torch.ones(seen.shape[1], dtype=torch.bool)
    others[index] = False
    return seen[:, index] & ~seen[:, others].any(dim=1)


def _class_fidelity(probabilities: torch.Tensor, class_name: str, label_names: Sequence[str]) -> dict[str, float]:
    return {
        rule: float(faithful_to_class(probabilities, class_name, label_names, exact).float().mean())
        for rule, exact in (("prompt_fidelity", False), ("prompt_fidelity_exact", True))
    }


def _reconstruct(autoencoder: torch.nn.Module, images: torch.Tensor, batch_size: int, device: Any) -> torch.Tensor:
    autoencoder = autoencoder.to(device).eval()
    with torch.no_grad():
        return torch.cat(
            [
                reconstruct_mean(autoencoder, images[i : i + batch_size].to(device)).cpu()
                for i in range(0, len(images), batch_size)
            ]
        )


def fidelity_ceilings(
    oracle: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    label_names: Sequence[str],
    autoencoder: torch.nn.Module | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """The prompt-fidelity rules (loose and exact, :func:`faithful_to_class`) applied to real images of each class
    (normal, or one finding alone, as the single-finding prompts describe) instead of samples: ``held_out_images``, how
    often the oracle agrees with real images, and with ``autoencoder``, ``autoencoder_reconstructions``, the same on
    their reconstructions (posterior mean, decoded): the most a generator that decodes through this autoencoder can
    score with this oracle. Classes without an image are left out; ``num_images`` counts each class's images.

    Args:
        images: ``(N, C, *spatial)`` real images.
        labels: ``(N, K)`` their multi-hot findings, in the order of ``label_names``.
    """
    present = labels > 0.5
    members = {"normal": ~present.any(dim=1)}
    for index, name in enumerate(label_names):
        members[name] = present[:, index] & (present.sum(dim=1) == 1)
    members = {name: rows for name, rows in members.items() if rows.any()}
    selected = torch.stack(list(members.values())).any(dim=0)
    sources = {"held_out_images": images[selected]}
    if autoencoder is not None:
        sources["autoencoder_reconstructions"] = _reconstruct(autoencoder, images[selected], batch_size, device)
    ceilings: dict[str, Any] = {"num_images": {name: int(rows.sum()) for name, rows in members.items()}}
    for source, source_images in sources.items():
        probabilities = torch.zeros(len(images), len(label_names))
        probabilities[selected], _ = oracle_predict(oracle, source_images, device=device)
        per_class = {name: _class_fidelity(probabilities[rows], name, label_names) for name, rows in members.items()}
        ceilings[source] = {
            rule: {name: value[rule] for name, value in per_class.items()}
            for rule in ("prompt_fidelity", "prompt_fidelity_exact")
        }
    return ceilings


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
    reference_labels: torch.Tensor | None = None,
    autoencoder: torch.nn.Module | None = None,
    batch_size: int = 8,
    off_manifold_k: int = 5,
    figure_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Prompt fidelity and FID of a text-to-image generator, judged by the oracle.

    Fidelity: for each finding, ``samples_per_prompt_class`` held-out single-finding reports are used as
    prompts, and fidelity is the fraction of those samples in which the oracle sees the finding
    (p > 0.5); for normal reports it is the fraction in which the oracle sees no finding.
    ``prompt_fidelity_exact`` counts a sample only when the oracle sees the prompted finding and no other.

    FID: one sample per held-out subject, prompted with that subject's report, against the held-out
    images themselves (oracle embeddings), so both sets share the finding mix. With
    ``second_reference_images`` (e.g. the validation split), the FID between the two real sets is
    reported as the floor that finite samples alone give.

    Off the manifold: of the same samples, the fraction in none of the testing images' ``off_manifold_k``-nearest-
    neighbour balls, in voxel space (:func:`~monai_cfx.metrics.compute_off_manifold_fraction`; ``off_manifold_samples``:
    their indices, which are their seeds), with the validation images' fraction as the floor. In voxel space, not
    oracle features: a chest texture without anatomy can look like an opacity to a finding classifier, not to a
    comparison with every scan.

    Ceilings, with ``reference_labels``: the same two rules applied to the held-out images of each class (normal, or
    that one finding alone), as ``held_out_images``: how often the oracle agrees with real images; and with
    ``autoencoder`` too, to those images' reconstructions (encoded to the posterior mean, decoded), as
    ``autoencoder_reconstructions``: the most a generator that decodes through this autoencoder can score, since
    every sample is a decoding.

    Args:
        generate: callable ``(prompts, seeds) -> images`` (e.g. ``functools.partial(generate_images, ...)``).
        reference_prompts: the reports of ``reference_images``, one per image.
        reference_labels: ``(N, K)`` multi-hot findings of ``reference_images``, in the order of ``label_names``.
        autoencoder: the generator's autoencoder (``decode_stage_2_outputs`` and an encoder).
        batch_size: images per autoencoder call.
        figure_path: a PNG of samples off the manifold beside samples on it
            (:func:`~monai_cfx.visualize.plot_manifold_check`), written before the metrics.
        off_manifold_k: the neighbour that sets each testing image's ball (5: 2.5 % of the 2D validation images fall
            outside, 3: 5.5 %).
    """
    check_option("kind", kind, ("chest", "brain"))
    if len(reference_images) < 2:
        raise ValueError(
            f"`reference_images` needs at least 2 images (FID, the manifold), got {len(reference_images)}."
        )
    if len(reference_prompts) != len(reference_images):
        raise ValueError(
            f"`reference_prompts` must have one report per reference image ({len(reference_images)}), "
            f"got {len(reference_prompts)}."
        )
    label_names = list(label_names)
    if reference_labels is not None and tuple(reference_labels.shape) != (len(reference_images), len(label_names)):
        raise ValueError(
            f"`reference_labels` must be ({len(reference_images)}, {len(label_names)}): one multi-hot row per "
            f"reference image over {label_names}, got {tuple(reference_labels.shape)}."
        )
    if autoencoder is not None and reference_labels is None:
        raise ValueError("`autoencoder` reconstructs the held-out images of each class: give `reference_labels` too.")
    for path in (output_path, figure_path):  # both or neither: refused before any sampling
        if path is not None:
            check_writable(path, overwrite)
    fidelity, fidelity_exact = {}, {}
    prompts_by_class = finding_prompts(kind, label_names, samples_per_prompt_class)
    for class_index, (name, class_prompts) in enumerate(prompts_by_class.items()):
        logger.info(
            f"prompt fidelity: {len(class_prompts)} samples of '{name}' ({class_index + 1}/{len(prompts_by_class)})"
        )
        seeds = [1000 * (class_index + 1) + i for i in range(len(class_prompts))]
        probabilities, _ = oracle_predict(oracle, generate(class_prompts, seeds), device=device)
        class_fidelity = _class_fidelity(probabilities, name, label_names)
        fidelity[name], fidelity_exact[name] = (
            class_fidelity["prompt_fidelity"],
            class_fidelity["prompt_fidelity_exact"],
        )
    logger.info(f"FID and off-manifold check: one sample per reference report ({len(reference_prompts)})")
    generated = generate(list(reference_prompts), list(range(len(reference_prompts))))
    _, generated_embeddings = oracle_predict(oracle, generated, device=device)
    _, reference_embeddings = oracle_predict(oracle, reference_images, device=device)
    # off the manifold: judged on the images themselves, where a texture without anatomy is far from every scan
    off_manifold_k = min(off_manifold_k, len(reference_images) - 1)  # a small reference set: its farthest neighbour
    off_manifold, off_flags = compute_off_manifold_fraction(
        generated.flatten(1), reference_images.flatten(1), k=off_manifold_k
    )
    metrics: dict[str, Any] = {
        "prompt_fidelity": fidelity,
        "prompt_fidelity_exact": fidelity_exact,
        "fid_oracle_features": float(FIDMetric()(generated_embeddings.double(), reference_embeddings.double())),
        "off_manifold_fraction": off_manifold,
        "off_manifold_samples": [int(i) for i in torch.nonzero(off_flags).flatten()],
        "off_manifold_k": off_manifold_k,
        "samples_per_prompt_class": samples_per_prompt_class,
        "num_reference_images": int(len(reference_images)),
    }
    if second_reference_images is not None:
        _, second_embeddings = oracle_predict(oracle, second_reference_images, device=device)
        metrics["fid_real_vs_real"] = float(FIDMetric()(second_embeddings.double(), reference_embeddings.double()))
        metrics["off_manifold_fraction_real"] = compute_off_manifold_fraction(
            second_reference_images.flatten(1), reference_images.flatten(1), k=off_manifold_k
        )[0]
    if figure_path is not None:
        from monai_cfx.visualize import plot_manifold_check  # matplotlib only when a figure is asked for

        plot_manifold_check(generated, off_flags, figure_path, overwrite=overwrite)
    if reference_labels is not None:
        logger.info("fidelity ceilings: the oracle on the reference images and on their reconstructions")
        metrics["fidelity_ceilings"] = fidelity_ceilings(
            oracle, reference_images, reference_labels, label_names, autoencoder, batch_size, device
        )
    if output_path is not None:
        write_json(metrics, output_path, overwrite=overwrite)
    return metrics


def stack_items(items: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor:
    """Stack one key of a list of item dicts (e.g. a loaded datalist) into a batch tensor."""
    return torch.stack([torch.as_tensor(item[key], dtype=torch.float32) for item in items])
