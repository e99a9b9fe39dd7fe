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
:func:`write_drift_search` writes the table and a figure of the search.
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
from monai.metrics import FIDMetric
from monai.utils import optional_import

from monai_cfx.apps.generation import generate_images, oracle_predict
from monai_cfx.data import generate_phantom
from monai_cfx.engines.finetune import prompt_with_token
from monai_cfx.inferers import check_drift
from monai_cfx.metrics import compute_kid
from monai_cfx.utils import atomic_path, check_finite, check_option, check_writable, save_figure, write_json

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "DriftSampler",
    "distribution_distances",
    "drift_along",
    "drift_grid",
    "phantom_drift_direction",
    "drift_search",
    "evaluate_drift",
    "latent_shift",
    "monte_carlo_l1",
    "split_fractions",
    "write_drift_search",
]

CRITERIA = ("l1", "fid", "kid")
# KID subsets: samples per subset (capped by the set sizes) and number of subsets
KID_SUBSET_SIZE, KID_NUM_SUBSETS = 100, 50
CSV_COLUMNS = ("drift", "l1", "fid", "kid", "kid_std", "seconds")
OUTPUT_NAMES = {"json": "drift_search.json", "csv": "drift_search.csv", "png": "drift_search.png"}

# elements of |x - y| held at once when averaging over pairs (about 64 MiB in float32)
_CHUNK_ELEMENTS = 1 << 24


def _check_images(name: str, images: Any, min_count: int = 1) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim not in (4, 5):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"`{name}` must be a (N, C, H, W) or (N, C, H, W, D) tensor, got {shape}.")
    if images.shape[0] < min_count:
        raise ValueError(f"`{name}` must hold at least {min_count} image(s), got {images.shape[0]}.")
    return images


def _check_pair(generated: Any, target: Any, min_count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generated = _check_images("generated", generated, min_count)
    target = _check_images("target", target, min_count)
    if generated.shape[1:] != target.shape[1:]:
        raise ValueError(
            "`generated` and `target` must have the same (C, *spatial) shape, got "
            f"{tuple(generated.shape[1:])} and {tuple(target.shape[1:])}."
        )
    return generated, target


def _pair_l1_sum(generated: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> float:
    """Sum over the pairs ``(generated[rows[k]], target[cols[k]])`` of the mean absolute voxel difference."""
    voxels = generated[0].numel()
    chunk = max(1, _CHUNK_ELEMENTS // voxels)
    total = 0.0
    for start in range(0, len(rows), chunk):
        x = generated[rows[start : start + chunk]].float()
        y = target[cols[start : start + chunk]].float()
        total += float((x - y).abs().flatten(1).mean(1).double().sum())
    return total


def monte_carlo_l1(generated: torch.Tensor, target: torch.Tensor, num_pairs: int = 4096, seed: int = 0) -> float:
    """Monte-Carlo estimate of ``E|x - y|``, the mean absolute voxel difference between an image ``x`` of
    ``generated`` and an image ``y`` of ``target`` drawn independently: the distance by which Latent
    Drifting chooses δ.

    When ``N * M <= num_pairs`` every pair is used and the value is exact (and symmetric in the two sets);
    otherwise ``num_pairs`` pairs are drawn uniformly with replacement from a ``torch.Generator`` seeded
    with ``seed``, so the estimate is reproducible.

    Args:
        generated: images ``(N, C, *spatial)``, 2D or 3D.
        target: images ``(M, C, *spatial)`` with the same ``(C, *spatial)`` shape.
        num_pairs: the most pairs to average over.
        seed: seed of the pair draws (used only when pairs are sampled).

    Returns:
        the mean absolute difference, a float.

    Raises:
        ValueError: when a set is not a 4D/5D tensor, is empty, or the shapes differ beyond the batch
            dimension, or ``num_pairs`` < 1.
    """
    generated, target = _check_pair(generated, target)
    if num_pairs < 1:
        raise ValueError(f"`num_pairs` must be >= 1, got {num_pairs}.")
    target = target.to(generated.device)
    n, m = generated.shape[0], target.shape[0]
    if n * m <= num_pairs:
        rows = torch.arange(n).repeat_interleave(m)
        cols = torch.arange(m).repeat(n)
    else:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randint(n, (num_pairs,), generator=generator)
        cols = torch.randint(m, (num_pairs,), generator=generator)
    rows, cols = rows.to(generated.device), cols.to(target.device)
    return _pair_l1_sum(generated, target, rows, cols) / len(rows)


def _distances(
    generated: torch.Tensor,
    target: torch.Tensor,
    oracle: torch.nn.Module | None,
    target_embeddings: torch.Tensor | None,
    device: str | torch.device,
    kid_subset_size: int,
    kid_num_subsets: int,
    seed: int,
) -> dict[str, Any]:
    metrics: dict[str, Any] = {"l1": monte_carlo_l1(generated, target, seed=seed)}
    metrics.update(fid=None, kid=None, kid_std=None)
    if oracle is not None:
        _, generated_embeddings = oracle_predict(oracle, generated, device=device)
        if target_embeddings is None:
            _, target_embeddings = oracle_predict(oracle, target, device=device)
        metrics["fid"] = float(FIDMetric()(generated_embeddings.double(), target_embeddings.double()))
        kid, kid_std = compute_kid(
            generated_embeddings, target_embeddings, subset_size=kid_subset_size, num_subsets=kid_num_subsets, seed=seed
        )
        metrics["kid"], metrics["kid_std"] = float(kid), float(kid_std)
    metrics["num_generated"], metrics["num_target"] = int(generated.shape[0]), int(target.shape[0])
    return metrics


def distribution_distances(
    generated: torch.Tensor,
    target: torch.Tensor,
    oracle: torch.nn.Module | None,
    device: str | torch.device = "cpu",
    kid_subset_size: int = KID_SUBSET_SIZE,
    kid_num_subsets: int = KID_NUM_SUBSETS,
    seed: int = 0,
) -> dict[str, Any]:
    """Distances between a set of generated images and a set of target images.

    ``l1`` is :func:`monte_carlo_l1` on the voxels; ``fid`` (MONAI's ``FIDMetric``) and ``kid`` /
    ``kid_std`` (:func:`monai_cfx.metrics.compute_kid`) are computed on the oracle's embeddings. FID is
    biased upwards with few samples, so compare FIDs only between sets of the same sizes; KID is
    unbiased and can be slightly negative.

    Args:
        generated: images ``(N, C, *spatial)``, 2D or 3D.
        target: images ``(M, C, *spatial)`` with the same ``(C, *spatial)`` shape.
        oracle: a module with ``logits_and_embedding(images) -> (logits, embedding)`` (e.g. a
            ``FindingClassifier``), or None for the L1 distance only.
        device: where the oracle runs.
        kid_subset_size: samples per KID subset (capped by the set sizes).
        kid_num_subsets: number of KID subsets.
        seed: seed of the L1 pair draws and of the KID subsets.

    Returns:
        ``{"l1", "fid", "kid", "kid_std", "num_generated", "num_target"}``; ``fid``, ``kid`` and
        ``kid_std`` are None without an oracle.

    Raises:
        ValueError: when the sets are not image batches of the same ``(C, *spatial)`` shape, are empty,
            or (with an oracle) hold fewer than 2 images each, which KID needs.
    """
    generated, target = _check_pair(generated, target, min_count=1 if oracle is None else 2)
    return _distances(generated, target, oracle, None, device, kid_subset_size, kid_num_subsets, seed)


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


def _drift_entry(drift: Any, index: int) -> float | tuple[float, ...]:
    """``drifts[index]`` as a float (one drift for all channels) or a tuple of floats (one per channel)."""
    return check_drift(drift, name=f"drifts[{index}]")


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
            a float, or a tuple of floats for a per-channel drift.
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
    candidates = [_drift_entry(drift, index) for index, drift in enumerate(drifts)]
    min_count = 1 if oracle is None else 2
    if isinstance(num_samples, bool) or not isinstance(num_samples, Integral) or num_samples < min_count:
        reason = " (KID needs 2 samples per set)" if oracle is not None else ""
        raise ValueError(f"`num_samples` must be an integer >= {min_count}{reason}, got {num_samples!r}.")
    target_images = _check_images("target_images", target_images, min_count)
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
        images = generate(drift, num_samples, seed)
        if not isinstance(images, torch.Tensor) or tuple(images.shape) != expected:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"`generate` must return images of shape {expected} (num_samples, *target_images.shape[1:]), "
                f"got {shape} for drift {drift!r}."
            )
        if not bool(torch.isfinite(images).all()):
            raise ValueError(f"`generate` returned NaN or Inf values for drift {drift!r}.")
        metrics = _distances(
            images, target_images, oracle, target_embeddings, device, KID_SUBSET_SIZE, KID_NUM_SUBSETS, seed
        )
        rows.append(
            {
                "drift": list(drift) if isinstance(drift, tuple) else drift,
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


def _drift_label(drift: Any) -> str:
    if isinstance(drift, (list, tuple)):
        return "(" + ", ".join(f"{float(v):g}" for v in drift) + ")"
    return f"{float(drift):g}"


def _same_drift(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
    return float(a) == float(b)


def _plot_drift_search(result: Mapping[str, Any], path: Path, overwrite: bool) -> None:
    """L1 (and FID and KID, when computed) against δ, the best δ marked by a vertical line and ringed points.

    Per-channel drifts have no natural order, so they are plotted against the grid index, without lines
    between the points, and the ticks are labelled with the drifts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    criterion = result.get("criterion", "l1")
    per_channel = any(isinstance(row["drift"], (list, tuple)) for row in rows)
    x = np.arange(len(rows), dtype=float) if per_channel else np.array([float(row["drift"]) for row in rows])
    matches = [i for i, row in enumerate(rows) if _same_drift(row["drift"], result["best_drift"])]
    best_index = matches[0] if matches else min(range(len(rows)), key=lambda i: _criterion_key(criterion)(rows[i]))
    order = np.argsort(x, kind="stable")
    xs, best_x = x[order], x[best_index]
    linestyle = "none" if per_channel else "-"

    def column(key: str) -> np.ndarray:
        return np.array([np.nan if row.get(key) is None else float(row[key]) for row in rows], dtype=float)

    def ring_best(axis: Any, key: str) -> None:
        value = column(key)[best_index]
        if np.isfinite(value):
            axis.plot([best_x], [value], "o", markersize=13, markerfacecolor="none", color="tab:red", zorder=5)

    best_value = rows[best_index].get(criterion)
    best_label = f"best δ = {_drift_label(rows[best_index]['drift'])} ({criterion.upper()}"
    best_label += f" {best_value:.4g})" if best_value is not None else ")"

    has_oracle = any(row.get("fid") is not None or row.get("kid") is not None for row in rows)
    fig, axes = plt.subplots(1, 2 if has_oracle else 1, figsize=(11 if has_oracle else 6, 4.4), squeeze=False)
    axes = list(axes[0])
    axes[0].plot(xs, column("l1")[order], marker="o", linestyle=linestyle, color="tab:blue", label="Monte-Carlo L1")
    ring_best(axes[0], "l1")
    axes[0].set_ylabel("mean |x − y| per voxel")
    axes[0].set_title("L1 distance to the target images")
    handles = []
    if has_oracle:
        fid_axis, kid_axis = axes[1], axes[1].twinx()
        handles.append(
            fid_axis.plot(xs, column("fid")[order], marker="s", linestyle=linestyle, color="tab:orange", label="FID")[0]
        )
        handles.append(
            kid_axis.errorbar(
                xs,
                column("kid")[order],
                yerr=np.nan_to_num(column("kid_std")[order]),
                marker="^",
                linestyle="none" if per_channel else "--",
                color="tab:green",
                capsize=3,
                label="KID ± std over subsets",
            )
        )
        ring_best(fid_axis, "fid")
        ring_best(kid_axis, "kid")
        fid_axis.set_ylabel("FID (oracle embeddings)", color="tab:orange")
        kid_axis.set_ylabel("KID (oracle embeddings)", color="tab:green")
        fid_axis.set_title("FID and KID to the target images")
    for axis in axes:
        line = axis.axvline(best_x, color="tab:red", linestyle=":", linewidth=1.5, label=best_label)
        axis.grid(alpha=0.3)
        if per_channel:
            axis.set_xticks(xs)
            labels = [_drift_label(rows[i]["drift"]) for i in order]
            axis.set_xticklabels(labels, rotation=45 if len(rows) > 4 else 0, ha="right" if len(rows) > 4 else "center")
            axis.set_xlabel("per-channel latent drift δ (one tick per grid point)")
        else:
            axis.set_xlabel("latent drift δ")
    axes[0].legend(fontsize=8)
    if has_oracle:
        handles.append(line)
        kid_axis.legend(handles, [h.get_label() for h in handles], fontsize=8)  # on top of both curves
    fig.suptitle(
        f"Latent drift search: {result.get('num_samples', '?')} samples per δ (same seed "
        f"{result.get('seed', '?')}) vs {result.get('num_target', '?')} target images",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path, overwrite, dpi=110)


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
    _plot_drift_search(result, paths["png"], overwrite)
    write_json(dict(result), paths["json"], overwrite=overwrite)
    with atomic_path(paths["csv"], overwrite) as tmp:
        tmp.write_text(buffer.getvalue())
    return paths


def split_fractions(*counts: int) -> list[float]:
    """The ``split`` fractions of :func:`monai_cfx.data.write_phantom_dataset` that give exactly ``counts`` subjects
    per split (training, validation, testing), e.g. ``split_fractions(32, 200, 200)``.

    Raises:
        ValueError: when ``counts`` is not three non-negative ints with a positive sum.
    """
    if len(counts) != 3 or any(isinstance(c, bool) or not isinstance(c, Integral) or c < 0 for c in counts):
        raise ValueError(f"`counts` must be three non-negative ints (training, validation, testing), got {counts!r}.")
    total = sum(counts)
    if total == 0:
        raise ValueError("`counts` must hold at least one subject.")
    return [c / total for c in counts]


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
    ) -> None:
        if not callable(getattr(inferer, "initial_sample", None)):
            raise ValueError(f"`inferer` must be a DriftLatentDiffusionInferer, got {type(inferer).__name__}.")
        self.inferer, self.autoencoder, self.unet, self.text_encoder = inferer, autoencoder, unet, text_encoder
        self.latent_shape = list(latent_shape)
        self.token = token
        self.prompts = list(prompts) if prompts is not None else []
        self.guidance_scale, self.num_inference_steps = guidance_scale, num_inference_steps
        self.batch_size, self.device = batch_size, device

    def prompt(self, text: str) -> str:
        """``text`` as the model was fine-tuned to read it: the token in front, if any."""
        return prompt_with_token(text, self.token)

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        drift: Any = None,
        verbose: bool = False,
    ) -> torch.Tensor:
        """Images ``(N, C, *spatial)`` in [0, 1] on the CPU, one per prompt, at ``drift`` (default: the inferer's)."""
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
    drift = sampler.inferer.drift if drift is None else drift
    generated = sampler.generate(list(reports), [seed + i for i in range(len(reports))], drift=drift, verbose=verbose)
    min_count = 1 if oracle is None else 2
    generated, target_images = _check_pair(generated, target_images, min_count)
    # the held-out images' embeddings serve both comparisons
    target_embeddings = oracle_predict(oracle, target_images, device=device)[1] if oracle is not None else None

    def distances(images: torch.Tensor) -> dict[str, Any]:
        return _distances(
            images, target_images, oracle, target_embeddings, device, KID_SUBSET_SIZE, KID_NUM_SUBSETS, seed
        )

    result: dict[str, Any] = {
        "drift": list(drift) if isinstance(drift, (tuple, list)) else float(drift),
        "generated": distances(generated),
        "real_vs_real": None,
    }
    if second_target_images is not None:
        result["real_vs_real"] = distances(_check_pair(second_target_images, target_images, min_count)[0])
    result["seconds"] = time.perf_counter() - start
    if figure_path is not None:
        _plot_samples(generated, target_images, list(reports), result, Path(figure_path), overwrite)
    return result


def _middle_slice(image: torch.Tensor) -> np.ndarray:
    """A 2D view of ``(C, *spatial)``: the image itself, or a volume's middle slice along its last axis."""
    array = image[0].numpy()
    return array if array.ndim == 2 else array[..., array.shape[-1] // 2]


def _plot_samples(
    generated: torch.Tensor,
    target: torch.Tensor,
    reports: list[str],
    result: Mapping[str, Any],
    path: Path,
    overwrite: bool,
    columns: int = 8,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(columns, len(generated))
    figure, axes = plt.subplots(2, columns, figsize=(1.6 * columns, 3.8), squeeze=False)
    for column in range(columns):
        for row, (images, name) in enumerate(((generated, "generated"), (target, "held-out target"))):
            axis = axes[row, column]
            axis.imshow(_middle_slice(images[column]).T, cmap="gray", vmin=0, vmax=1, origin="upper")
            axis.set_xticks([]), axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(name, fontsize=8)
        words = reports[column].split()
        axes[0, column].set_title(" ".join(words[-4:])[:30], fontsize=6)
    measures = result["generated"]
    summary = f"L1 {measures['l1']:.4f}"
    if measures.get("fid") is not None:
        summary += f", FID {measures['fid']:.2f}, KID {measures['kid']:.3f}"
    figure.suptitle(f"drift δ = {result['drift']}: {summary} (one sample per held-out report)", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path, overwrite=overwrite)


@torch.no_grad()
def latent_shift(
    autoencoder: torch.nn.Module,
    source_images: torch.Tensor,
    target_images: torch.Tensor,
    scale_factor: float = 1.0,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Per-channel difference of the mean scaled latent (posterior means) of ``target_images`` and ``source_images``.

    A direction for a per-channel drift: the target domain's latents sit, on average, this far from the source
    domain's (e.g. the chest phantom's target acquisition: about ``[0.08, 0.41, -0.97]`` with the shipped
    autoencoder).

    Args:
        autoencoder: the autoencoder (anything with ``encode(images) -> (z_mu, z_sigma)``).
        source_images: images of the source domain ``(N, C, *spatial)``.
        target_images: images of the target domain, same layout.
        scale_factor: the latent scale of the diffusion model.
        batch_size: images per encoder call.
        device: where the encoder runs.

    Returns:
        one value per latent channel: mean target latent minus mean source latent.

    Raises:
        ValueError: when either set is not a batch of 2D or 3D images.
    """
    means = []
    for name, images in (("source_images", source_images), ("target_images", target_images)):
        images = _check_images(name, images)
        total = None
        for start in range(0, len(images), batch_size):
            z_mu, _ = autoencoder.encode(images[start : start + batch_size].to(device))
            sums = (z_mu.float() * scale_factor).sum(dim=[0, *range(2, z_mu.ndim)])
            total = sums if total is None else total + sums
        means.append(total / (len(images) * int(np.prod(z_mu.shape[2:]))))
    return [float(value) for value in (means[1] - means[0]).cpu()]


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
    direction = list(check_drift(list(direction), name="direction"))  # type: ignore[arg-type]
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
    :func:`latent_shift` of the target images from ``num_source_images`` source phantoms of ``kind`` (seeds
    0, 1, ..., at the target's size), divided by ``num_inference_steps`` because the drift is added after every
    sampling step. Scale it with :func:`drift_along`.

    Raises:
        ValueError: when ``target_images`` is not a batch of square 2D or cubic 3D images, or
            ``num_inference_steps`` / ``num_source_images`` is not positive.
    """
    target_images = _check_images("target_images", target_images)
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
