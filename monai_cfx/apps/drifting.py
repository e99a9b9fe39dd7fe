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
"""Choosing the latent drift δ of Latent Drifting (Yeganeh et al., arXiv 2412.20651) by a grid search.

The paper picks δ from a grid over [-0.2, 0.2] by the Monte-Carlo L1 distance between generated samples
and a small set of target images. :func:`drift_search` does this for any ``generate(drift, num_samples,
seed)`` callable (e.g. one that sets ``DriftLatentDiffusionInferer.drift`` and samples), and can also
judge each δ by FID and KID on the embeddings of an evaluation classifier (the "oracle");
:func:`write_drift_search` writes the table and a figure of the search. The distances live in
:mod:`monai_cfx.metrics.distribution`, the figures in :mod:`monai_cfx.visualize.drifting`.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import optional_import

from monai_cfx.apps.generation import generate_images
from monai_cfx.data import generate_phantom
from monai_cfx.engines.finetune import prompt_with_token
from monai_cfx.inferers import Drift, SamplingHook
from monai_cfx.inferers.sampling import check_hooks
from monai_cfx.metrics import distribution_distances, latent_shift, oracle_predict
from monai_cfx.utils import (
    atomic_path,
    check_finite,
    check_image_pair,
    check_images,
    check_option,
    check_writable,
    write_json,
)
from monai_cfx.visualize import plot_drift_samples, plot_drift_search

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "DriftSampler",
    "drift_along",
    "drift_grid",
    "drift_search",
    "evaluate_drift",
    "phantom_drift_direction",
    "write_drift_search",
]

CRITERIA = ("l1", "fid", "kid")
CSV_COLUMNS = ("drift", "l1", "fid", "kid", "kid_std", "seconds")
OUTPUT_NAMES = {"json": "drift_search.json", "csv": "drift_search.csv", "png": "drift_search.png"}


def drift_grid(low: float = -0.2, high: float = 0.2, num: int = 9) -> list[float]:
    """``num`` evenly spaced drifts from ``low`` to ``high`` inclusive, rounded to 6 decimals.

    The rounding makes the grid points exact decimals (the middle point of the default grid is exactly
    ``0.0``, so the undrifted model is one of the candidates). A grid that omits 0 (e.g. an even ``num``
    over a symmetric range) is allowed, but then the search does not compare against the undrifted
    model; ``num=1`` gives ``[low]``.

    Args:
        low: the smallest drift.
        high: the largest drift.
        num: the number of grid points.

    Raises:
        ValueError: when ``num`` < 1, ``low`` > ``high`` or a bound is not finite.
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"`low` and `high` must be finite, got {low!r} and {high!r}.")
    if low > high:
        raise ValueError(f"`low` must be <= `high`, got low={low!r} and high={high!r}.")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"`num` must be an integer >= 1, got {num!r}.")
    # "+ 0.0" turns a rounded -0.0 into 0.0
    return [round(float(value), 6) + 0.0 for value in np.linspace(low, high, num)]


def _criterion_key(criterion: str) -> Callable[[Mapping[str, Any]], float]:
    def key(row: Mapping[str, Any]) -> float:
        value = row[criterion]
        return math.inf if value is None or math.isnan(value) else value

    return key


def drift_search(
    generate: Callable[[float | tuple[float, ...], int, int], torch.Tensor],
    drifts: Sequence[float | Sequence[float]],
    target_images: torch.Tensor,
    oracle: torch.nn.Module | None = None,
    num_samples: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    criterion: str = "l1",
    verbose: bool = True,
) -> dict[str, Any]:
    """Grid search for the latent drift δ whose samples are closest to ``target_images``.

    Every δ is given the same ``seed`` (common random numbers): with a generator whose noise depends only
    on the seed, the samples of two drifts differ only through δ, so their distances differ by the effect
    of δ rather than by sampling noise, and a small target set suffices. The undrifted model is compared
    only if ``drifts`` includes 0 (as :func:`drift_grid`'s default does).

    Example::

        def generate(drift, num_samples, seed):
            inferer.drift = drift  # a DriftLatentDiffusionInferer
            noise = seeded_noise(latent_shape, range(seed, seed + num_samples))
            return inferer.sample(noise, autoencoder, diffusion).clamp(0, 1).cpu()

        result = drift_search(generate, drift_grid(), target_images, oracle=classifier)
        write_drift_search(result, "eval/drift")

    Args:
        generate: callable ``(drift, num_samples, seed) -> images (num_samples, C, *spatial)``; ``drift`` is
            :meth:`Drift.tolist() <monai_cfx.inferers.Drift.tolist>`: a float, or a list of floats for a per-channel
            drift (an inferer's ``drift`` takes either).
        drifts: the candidate drifts: numbers, or sequences with one number per latent channel.
        target_images: the target set ``(M, C, *spatial)``, 2D or 3D.
        oracle: a module with ``logits_and_embedding`` for FID and KID, or None for the L1 distance only.
        num_samples: images generated per drift.
        device: where the oracle runs.
        seed: passed to ``generate`` for every drift, and seeds the L1 pair draws and the KID subsets.
        criterion: which distance chooses δ: ``"l1"`` (the paper's), ``"fid"`` or ``"kid"`` (need an oracle).
        verbose: show a tqdm progress bar over the drifts.

    Returns:
        ``{"criterion", "best_drift", "best", "rows", "num_samples", "num_target", "seed"}``: one row
        ``{"drift", "l1", "fid", "kid", "kid_std", "seconds"}`` per drift in the given order (``seconds``:
        generation and evaluation; ``fid``/``kid``/``kid_std`` None without an oracle; a per-channel
        drift stored as a list), ``best`` the row with the smallest criterion (the first on ties;
        NaN counts as worst) and ``best_drift`` its drift.

    Raises:
        ValueError: when ``drifts`` is empty or holds a non-finite or malformed value, ``criterion`` is
            unknown or needs a missing oracle, ``num_samples`` is too small (2 with an oracle, for KID),
            ``target_images`` is not an image batch, or ``generate`` returns something other than
            ``(num_samples, *target_images.shape[1:])`` finite images.
    """
    check_option("criterion", criterion, CRITERIA)
    if criterion != "l1" and oracle is None:
        raise ValueError(f"`criterion` {criterion!r} is computed on oracle embeddings; pass an `oracle`.")
    if isinstance(drifts, (str, bytes)) or not isinstance(drifts, (Sequence, np.ndarray, torch.Tensor)):
        raise ValueError(f"`drifts` must be a sequence of drifts, got {type(drifts).__name__}.")
    if len(drifts) == 0:
        raise ValueError("`drifts` must hold at least one drift, got an empty sequence.")
    candidates = [Drift(drift, name=f"drifts[{index}]") for index, drift in enumerate(drifts)]
    min_count = 1 if oracle is None else 2
    if isinstance(num_samples, bool) or not isinstance(num_samples, Integral) or num_samples < min_count:
        reason = " (KID needs 2 samples per set)" if oracle is not None else ""
        raise ValueError(f"`num_samples` must be an integer >= {min_count}{reason}, got {num_samples!r}.")
    target_images = check_images("target_images", target_images, min_count)
    check_finite("target_images", target_images)
    num_samples = int(num_samples)
    expected = (num_samples, *target_images.shape[1:])

    target_embeddings = None
    if oracle is not None:
        _, target_embeddings = oracle_predict(oracle, target_images, device=device)
    rows = []
    progress = tqdm(candidates, desc="drift search") if verbose and has_tqdm else candidates
    for drift in progress:
        start = time.perf_counter()
        images = generate(drift.tolist(), num_samples, seed)
        if not isinstance(images, torch.Tensor) or tuple(images.shape) != expected:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"`generate` must return images of shape {expected} (num_samples, *target_images.shape[1:]), "
                f"got {shape} for drift {drift.tolist()!r}."
            )
        if not bool(torch.isfinite(images).all()):
            raise ValueError(f"`generate` returned NaN or Inf values for drift {drift.tolist()!r}.")
        metrics = distribution_distances(
            images, target_images, oracle, device, seed=seed, target_embeddings=target_embeddings
        )
        rows.append(
            {
                "drift": drift.tolist(),
                **{key: metrics[key] for key in ("l1", "fid", "kid", "kid_std")},
                "seconds": time.perf_counter() - start,
            }
        )
        if progress is not candidates:
            progress.set_postfix({criterion: f"{metrics[criterion]:.4g}"}, refresh=False)
    best = min(rows, key=_criterion_key(criterion))
    return {
        "criterion": criterion,
        "best_drift": best["drift"],
        "best": best,
        "rows": rows,
        "num_samples": num_samples,
        "num_target": int(target_images.shape[0]),
        "seed": seed,
    }


def _format_value(value: Any) -> str:
    """A CSV cell: empty for None, ``repr`` of a float (round-trips), a per-channel drift space-separated."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(_format_value(v) for v in value)
    return repr(float(value))


def _same_drift(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
    return float(a) == float(b)


def _best_index(result: Mapping[str, Any]) -> int:
    """The row of ``result["best_drift"]`` (the first match), or of the smallest criterion if none matches."""
    rows, criterion = result["rows"], result.get("criterion", "l1")
    matches = [i for i, row in enumerate(rows) if _same_drift(row["drift"], result["best_drift"])]
    return matches[0] if matches else min(range(len(rows)), key=lambda i: _criterion_key(criterion)(rows[i]))


def write_drift_search(
    result: Mapping[str, Any], output_dir: str | os.PathLike, overwrite: bool = False
) -> dict[str, Path]:
    """Write a :func:`drift_search` result as ``drift_search.json`` (all of it), ``drift_search.csv`` (one row
    per drift: ``drift,l1,fid,kid,kid_std,seconds``; a per-channel drift as space-separated numbers, a
    missing value as an empty cell) and ``drift_search.png`` (the distances against δ, the best δ marked).

    All three targets are checked before the first write, so an existing file (without ``overwrite``)
    stops the call before anything is written; each file is written atomically.

    Args:
        result: the dict returned by :func:`drift_search` (or read back from its JSON).
        output_dir: the folder to write into (created if missing).
        overwrite: replace existing files.

    Returns:
        ``{"json", "csv", "png"}``: the paths written.

    Raises:
        ValueError: when ``result`` lacks ``rows``, ``criterion`` or ``best_drift``, or has no rows.
        FileExistsError: when a target exists and ``overwrite`` is False.
    """
    missing = [key for key in ("rows", "criterion", "best_drift") if key not in result]
    if missing:
        raise ValueError(f"`result` must be a drift_search result; it lacks {missing}.")
    if len(result["rows"]) == 0:
        raise ValueError("`result` must hold at least one row, got none.")
    output_dir = Path(output_dir)
    paths = {key: output_dir / name for key, name in OUTPUT_NAMES.items()}
    for path in paths.values():
        check_writable(path, overwrite)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in result["rows"]:
        writer.writerow([_format_value(row.get(key)) for key in CSV_COLUMNS])
    # the figure first: it is the step that can fail on odd results, and nothing is written before it
    plot_drift_search(result, _best_index(result), paths["png"], overwrite)
    write_json(dict(result), paths["json"], overwrite=overwrite)
    with atomic_path(paths["csv"], overwrite) as tmp:
        tmp.write_text(buffer.getvalue())
    return paths


class DriftSampler:
    """Sampling from a (fine-tuned) text-to-image latent diffusion model at any drift δ.

    ``sampler.generate(prompts, seeds, drift)`` gives one image per prompt, with the fine-tuning token in front of
    every prompt; ``sampler(drift, num_samples, seed)`` is the ``generate`` callable of :func:`drift_search`, cycling
    through :attr:`prompts` (e.g. the target set's reports) from seed ``seed`` on, so that every δ sees the same
    prompts and the same noise.

    Args:
        inferer: a :class:`~monai_cfx.inferers.DriftLatentDiffusionInferer`; its ``drift`` is the default δ and is
            restored after each call.
        autoencoder: the autoencoder that decodes the latents.
        unet: the diffusion model.
        text_encoder: the text encoder (holding the token of a Textual Inversion or Custom Diffusion checkpoint).
        latent_shape: ``(C, *spatial)`` of a latent.
        token: the fine-tuning token (``None`` for the pretrained model or mode ``full``).
        prompts: the prompts that ``__call__`` cycles through; set them before a search.
        guidance_scale, num_inference_steps, batch_size, device: as :func:`~monai_cfx.apps.generation.generate_images`.
        hooks: step hooks of every sampling run, before a call's own ``hooks`` (e.g.
            :func:`~monai_cfx.apps.generation.clip_hooks`).
    """

    def __init__(
        self,
        inferer: Any,
        autoencoder: torch.nn.Module,
        unet: torch.nn.Module,
        text_encoder: Any,
        latent_shape: Sequence[int],
        token: str | None = None,
        prompts: Sequence[str] | None = None,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 50,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        hooks: Sequence[SamplingHook] = (),
    ) -> None:
        if not callable(getattr(inferer, "initial_sample", None)):
            raise ValueError(f"`inferer` must be a DriftLatentDiffusionInferer, got {type(inferer).__name__}.")
        self.inferer, self.autoencoder, self.unet, self.text_encoder = inferer, autoencoder, unet, text_encoder
        self.latent_shape = list(latent_shape)
        self.token = token
        self.prompts = list(prompts) if prompts is not None else []
        self.guidance_scale, self.num_inference_steps = guidance_scale, num_inference_steps
        self.batch_size, self.device = batch_size, device
        self.hooks = check_hooks(hooks)

    def prompt(self, text: str) -> str:
        """``text`` as the model was fine-tuned to read it: the token in front, if any."""
        return prompt_with_token(text, self.token)

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        drift: Any = None,
        verbose: bool = False,
        hooks: Sequence[SamplingHook] = (),
    ) -> torch.Tensor:
        """Images ``(N, C, *spatial)`` in [0, 1] on the CPU, one per prompt, at ``drift`` (a
        :class:`~monai_cfx.inferers.Drift` or its value; default: the inferer's), with extra step ``hooks``."""
        previous = self.inferer.drift
        if drift is not None:
            self.inferer.drift = drift
        try:
            return generate_images(
                self.inferer,
                self.autoencoder,
                self.unet,
                self.text_encoder,
                [self.prompt(p) for p in prompts],
                seeds,
                latent_shape=self.latent_shape,
                guidance_scale=self.guidance_scale,
                num_inference_steps=self.num_inference_steps,
                batch_size=self.batch_size,
                device=self.device,
                verbose=verbose,
                hooks=[*self.hooks, *hooks],
            )
        finally:
            self.inferer.drift = previous

    def __call__(self, drift: Any, num_samples: int, seed: int) -> torch.Tensor:
        """``num_samples`` images at ``drift``, prompted with :attr:`prompts` in turn, seeds ``seed`` on: the
        ``generate`` callable of :func:`drift_search`."""
        if not self.prompts:
            raise ValueError("`prompts` is empty: set the prompts to cycle through (e.g. the target reports).")
        prompts = [self.prompts[i % len(self.prompts)] for i in range(num_samples)]
        return self.generate(prompts, [seed + i for i in range(num_samples)], drift=drift)


def evaluate_drift(
    sampler: DriftSampler,
    reports: Sequence[str],
    target_images: torch.Tensor,
    oracle: torch.nn.Module | None,
    drift: Any = None,
    second_target_images: torch.Tensor | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    verbose: bool = True,
    figure_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """FID, KID and Monte-Carlo L1 of samples against held-out target images.

    One sample per held-out report (with the model's token), so the generated and real sets share the finding mix;
    ``second_target_images`` (another held-out split) gives the real-versus-real floor of each measure.
    With ``figure_path``, the first samples are drawn above the held-out images of the same reports (3D: the
    middle slice), to see what the numbers measure.

    Args:
        sampler: the :class:`DriftSampler` of the model (its token is put in front of every report).
        reports: one report per held-out target image; sample ``i`` is prompted with ``reports[i]`` and seed
            ``seed + i``.
        target_images: the held-out target images ``(N, C, *spatial)``.
        oracle: the evaluation classifier whose embeddings give FID and KID (``None``: L1 only).
        drift: the sampling drift (default: the sampler's inferer's).
        second_target_images: another held-out split, for the real-versus-real floor.
        seed: first noise seed.
        device: where the oracle runs.
        verbose: progress bars while sampling.
        figure_path: where to draw the samples above the held-out images (``None``: no figure).
        overwrite: replace an existing figure.

    Returns:
        ``{"drift", "generated": {l1, fid, kid, kid_std, ...}, "real_vs_real": {...} or None, "seconds"}``.

    Raises:
        ValueError: when ``reports`` and ``target_images`` differ in count, or the images are malformed.
        FileExistsError: when ``figure_path`` exists and ``overwrite`` is false (before any sampling).
    """
    if len(reports) != len(target_images):
        raise ValueError(f"`reports` must hold one report per target image ({len(target_images)}), got {len(reports)}.")
    if figure_path is not None:
        check_writable(figure_path, overwrite)
    start = time.perf_counter()
    drift = sampler.inferer.drift if drift is None else Drift(drift)
    generated = sampler.generate(list(reports), [seed + i for i in range(len(reports))], drift=drift, verbose=verbose)
    min_count = 1 if oracle is None else 2
    generated, target_images = check_image_pair(generated, target_images, min_count)
    # the held-out images' embeddings serve both comparisons
    target_embeddings = oracle_predict(oracle, target_images, device=device)[1] if oracle is not None else None

    def distances(images: torch.Tensor) -> dict[str, Any]:
        return distribution_distances(
            images, target_images, oracle, device, seed=seed, target_embeddings=target_embeddings
        )

    result: dict[str, Any] = {
        "drift": drift.tolist(),
        "generated": distances(generated),
        "real_vs_real": None,
    }
    if second_target_images is not None:
        result["real_vs_real"] = distances(check_image_pair(second_target_images, target_images, min_count)[0])
    result["seconds"] = time.perf_counter() - start
    if figure_path is not None:
        plot_drift_samples(generated, target_images, list(reports), result, Path(figure_path), overwrite)
    return result


def drift_along(direction: Sequence[float], scales: Sequence[float]) -> list[list[float]]:
    """A grid of per-channel drifts ``scale * direction``, one per scale (e.g. ``direction`` = the latent shift
    divided by the number of sampling steps, since the drift is added after every step).

    Args:
        direction: one number per latent channel.
        scales: the multiples of ``direction`` to search.

    Returns:
        one per-channel drift (a list) per scale, for :func:`drift_search`.

    Raises:
        ValueError: when ``direction`` is empty or not finite, or ``scales`` is empty or holds a non-finite value.
    """
    direction = list(Drift(list(direction), name="direction").values)
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ValueError(f"`scales` must be a non-empty sequence of numbers, got {scales!r}.")
    grid = []
    for index, scale in enumerate(scales):
        if not isinstance(scale, Real) or isinstance(scale, bool) or not math.isfinite(scale):
            raise ValueError(f"`scales[{index}]` must be a finite number, got {scale!r}.")
        grid.append([round(float(scale) * value, 8) for value in direction])
    return grid


def phantom_drift_direction(
    autoencoder: torch.nn.Module,
    kind: str,
    target_images: torch.Tensor,
    scale_factor: float,
    num_inference_steps: int,
    num_source_images: int = 128,
    device: str | torch.device = "cpu",
) -> list[float]:
    """The per-step direction of a per-channel drift from the source phantoms to ``target_images``: the
    :func:`~monai_cfx.metrics.latent_shift` of the target images from ``num_source_images`` source phantoms of
    ``kind`` (seeds 0, 1, ..., at the target's size), divided by ``num_inference_steps`` because the drift is added
    after every sampling step. Scale it with :func:`drift_along`.

    Raises:
        ValueError: when ``target_images`` is not a batch of square 2D or cubic 3D images, or
            ``num_inference_steps`` / ``num_source_images`` is not positive.
    """
    target_images = check_images("target_images", target_images)
    if num_inference_steps < 1 or num_source_images < 1:
        raise ValueError(
            f"`num_inference_steps` and `num_source_images` must be positive, got {num_inference_steps} and "
            f"{num_source_images}."
        )
    size = target_images.shape[-1]
    source = torch.stack(
        [torch.as_tensor(generate_phantom(kind, seed, size=size)["image"]) for seed in range(num_source_images)]
    )
    shift = latent_shift(autoencoder, source, target_images, scale_factor, device=device)
    return [value / num_inference_steps for value in shift]
