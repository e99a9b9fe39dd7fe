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
"""The trajectory traversal bundle's jobs: traverse seeds or scans in batches, write a run's outputs all together,
and evaluate CFRT, the cosine curve and identity preservation over seeds (the configs hold the choices)."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from monai_cfx.apps.bundle_io import to_scan_grid
from monai_cfx.data import generate_phantom
from monai_cfx.inferers import TrajectoryTraversalInferer, linear_path, seeded_noise
from monai_cfx.metrics import (
    compute_cfrt,
    compute_identity_preservation,
    compute_latent_direction_cosine,
    compute_monotone_fraction,
    distribution_distances,
    oracle_predict,
)
from monai_cfx.networks.utils import encode_mean
from monai_cfx.utils import atomic_directory, write_json, write_nifti
from monai_cfx.visualize import plot_image_strip, plot_traversal_curves, save_trajectory_gif

__all__ = [
    "evaluate_traversal",
    "merge_rank_traversals",
    "run_inference",
    "save_traversal",
    "traversal_inputs",
    "traverse",
    "write_evaluation",
]


def _check_prompts(neutral_prompt: Any, target_prompt: Any) -> None:
    for name, prompt in (("neutral_prompt", neutral_prompt), ("target_prompt", target_prompt)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"`{name}` must be a non-empty string, got {prompt!r}.")
    if neutral_prompt.strip() == target_prompt.strip():
        warnings.warn(
            f"`target_prompt` equals `neutral_prompt` ({neutral_prompt!r}): every swap gives the neutral image.",
            stacklevel=3,
        )


def traversal_inputs(
    seeds: Sequence[int] | None,
    datalist: str | os.PathLike | None,
    dataset_dir: str | os.PathLike,
    data_list_key: str,
    preprocessing: Any,
    autoencoder: torch.nn.Module | None = None,
    max_reconstruction_mse: float | None = None,
    distributed: bool = False,
) -> dict[str, Any]:
    """What the inference config traverses, checked before the diffusion model is loaded: the scans of ``datalist``
    brought to the model's input by ``preprocessing`` (:func:`~monai_cfx.transforms.scan_preprocessing`, through
    :func:`~monai_cfx.apps.bundle_io.prepare_scans`, with the out-of-distribution check when ``autoencoder`` and
    ``max_reconstruction_mse`` are given), or else ``seeds``.

    With ``distributed`` (an initialised process group) this process keeps only its share, the items
    ``rank, rank + world_size, ...``, and prepares only those scans; the names stay those of the whole run.

    Returns:
        ``{"seeds": [...] or None, "scans": None or prepare_scans' {"images", "prepared", "names", "affines"},
        "count": the whole run's number of items, "rank", "world_size"}``; a process whose share is empty gets
        ``seeds`` ``[]`` or ``scans`` ``{"names": []}``.

    Raises:
        FileNotFoundError: when the datalist does not exist.
        ValueError: when the datalist has no ``data_list_key`` items, an item's ``image`` is missing or empty, a scan
            cannot be used (the message names the file), or (without a datalist) ``seeds`` is empty or not a list
            of ints.
    """
    from monai_cfx.apps.bundle_io import load_datalist, prepare_scans, scan_names

    rank, world_size = _process_share(distributed)
    shard = {"rank": rank, "world_size": world_size}
    if datalist is None:
        valid = isinstance(seeds, Sequence) and not isinstance(seeds, str) and len(seeds) > 0
        if not valid or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):  # type: ignore
            raise ValueError(f"`seeds` must be a non-empty list of ints when no datalist is given, got {seeds!r}.")
        repeated = sorted({int(s) for s in seeds if list(seeds).count(s) > 1})  # type: ignore[union-attr]
        if repeated:
            raise ValueError(f"`seeds` must not repeat a seed (each names its own outputs), got {repeated} twice.")
        seeds = [int(s) for s in seeds]  # type: ignore[union-attr]
        return {"seeds": seeds[rank::world_size], "scans": None, "count": len(seeds), **shard}
    items = load_datalist(datalist, data_list_key, dataset_dir, path_keys=["image"])
    names, share = scan_names(items)[rank::world_size], items[rank::world_size]
    scans = prepare_scans(share, preprocessing, autoencoder, max_reconstruction_mse) if share else {}
    return {"seeds": None, "scans": {**scans, "names": names}, "count": len(items), **shard}


def _process_share(distributed: bool) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in an initialised process group when ``distributed``, else (0, 1)."""
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("`distributed` runs need an initialised process group (torchrun and the config's "
                           "initialize step, configs/multi_gpu_inference.json).")  # fmt: skip
    return dist.get_rank(), dist.get_world_size()


def run_inference(
    inferer: TrajectoryTraversalInferer,
    scan_inferer: TrajectoryTraversalInferer,
    diffusion_model: torch.nn.Module,
    autoencoder_model: torch.nn.Module,
    text_encoder: Any,
    neutral_prompt: str,
    target_prompt: str,
    output_dir: str | os.PathLike,
    *,
    inputs: Mapping[str, Any],
    latent_shape: Sequence[int],
    affine: np.ndarray,
    settings: Mapping[str, Any],
    oracle: torch.nn.Module | None = None,
    label_names: Sequence[str] = (),
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    preprocessing: Any = None,
) -> dict[str, Any]:
    """The inference config's job: traverse the scans of ``inputs`` (:func:`traversal_inputs`) with ``scan_inferer``,
    or else its seeds with ``inferer``, and write the outputs with :func:`save_traversal` (the scans' NIfTI outputs
    back on each scan's own grid through ``preprocessing``'s inverse).

    With ``inputs`` of a distributed run (``world_size`` > 1), every process traverses its share and writes it into
    its own folder under ``.<output_dir name>.ranks`` beside ``output_dir``; when all have finished, rank 0 merges
    them into ``output_dir`` (:func:`merge_rank_traversals`), so that it holds what one process writes. Returns the
    record of ``traversal.json`` (``None`` on the other ranks of a distributed run).
    """
    scans, seeds = inputs["scans"], inputs["seeds"]
    rank, world_size = inputs.get("rank", 0), inputs.get("world_size", 1)
    output_dir = Path(output_dir)
    staging = output_dir.parent / f".{output_dir.name}.ranks"
    if world_size > 1:
        dist.barrier()  # every process has checked its scans: a refused one stops the run before anything is written
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # a killed run's
            staging.mkdir(parents=True)
        dist.barrier()
    run = None
    if scans is not None and scans["names"]:
        run = traverse(scan_inferer, diffusion_model, autoencoder_model, text_encoder, neutral_prompt, target_prompt,
                       images=scans["images"], batch_size=batch_size, device=device)  # fmt: skip
        names, affines = scans["names"], scans["affines"]
        scan_grids = scans.get("prepared")
    elif seeds:
        run = traverse(inferer, diffusion_model, autoencoder_model, text_encoder, neutral_prompt, target_prompt,
                       seeds=seeds, latent_shape=latent_shape, batch_size=batch_size, device=device)  # fmt: skip
        names, affines = [f"seed_{int(seed)}" for seed in seeds], [affine] * len(seeds)
        scan_grids = None
    if world_size == 1:
        return save_traversal(run, output_dir, names, affines, settings, oracle=oracle, label_names=label_names,
                              device=device, overwrite=overwrite, scan_grids=scan_grids,
                              preprocessing=preprocessing)  # fmt: skip
    if run is not None:  # a process without a share (more processes than items) writes nothing
        save_traversal(run, staging / f"rank_{rank}", names, affines, settings, oracle=oracle,
                       label_names=label_names, device=device, scan_grids=scan_grids,
                       preprocessing=preprocessing)  # fmt: skip
    dist.barrier()
    manifest = None
    if rank == 0:
        manifest = merge_rank_traversals(staging, output_dir, inputs["count"], world_size, overwrite=overwrite)
    dist.barrier()
    return manifest


def merge_rank_traversals(
    staging: str | os.PathLike, output_dir: str | os.PathLike, count: int, world_size: int, overwrite: bool = False
) -> dict[str, Any]:
    """Merge the per-process folders of a distributed traversal run (``staging/rank_<r>``, each written by
    :func:`save_traversal` for the items ``r, r + world_size, ...`` of ``count``) into ``output_dir``, all together or
    not at all: every file, and one ``traversal.json`` with the trajectories in the run's order and the network calls
    of all processes. ``staging`` is removed afterwards.

    Raises:
        FileNotFoundError: when a process with a share left no ``traversal.json`` (it did not finish).
        ValueError: when a process's record does not hold its share or its settings differ.
    """
    staging, count, world_size = Path(staging), int(count), int(world_size)
    records: list[Any] = [None] * count
    merged: dict[str, Any] | None = None
    calls = 0
    folders = []
    for rank in range(world_size):
        share = range(rank, count, world_size)
        if not share:
            continue
        folder = staging / f"rank_{rank}"
        if not (folder / "traversal.json").is_file():
            raise FileNotFoundError(f"{str(folder / 'traversal.json')!r} is missing: process {rank} did not finish.")
        manifest = json.loads((folder / "traversal.json").read_text())
        if len(manifest["trajectories"]) != len(share):
            raise ValueError(f"{str(folder / 'traversal.json')!r} holds {len(manifest['trajectories'])} trajectories, "
                             f"expected process {rank}'s share of {len(share)}.")  # fmt: skip
        if merged is not None and manifest["settings"] != merged["settings"]:
            raise ValueError(f"{str(folder / 'traversal.json')!r} was written with other settings than rank 0's.")
        merged = merged or manifest
        for index, record in zip(share, manifest["trajectories"]):
            records[index] = record
        calls += manifest.get("num_model_calls") or 0
        folders.append(folder)
    if merged is None:
        raise ValueError(f"a traversal run of {count} items has nothing to merge.")
    merged = {**merged, "trajectories": records, "num_model_calls": calls}
    with atomic_directory(output_dir, overwrite) as target:
        for folder in folders:
            for path in folder.iterdir():
                if path.name != "traversal.json":
                    os.replace(path, Path(target) / path.name)
        write_json(merged, Path(target) / "traversal.json")
    shutil.rmtree(staging)
    return merged


# the tensors of a traversal run and the dimension that indexes its trajectories
_TRAJECTORY_DIM = {"initial_latent": 0, "neutral_latent": 0, "swap_latents": 1, "frame_latents": 1, "frames": 1,
                   "swap_images": 1}  # fmt: skip


@torch.no_grad()
def traverse(
    inferer: TrajectoryTraversalInferer,
    diffusion_model: torch.nn.Module,
    autoencoder_model: torch.nn.Module,
    text_encoder: Any,
    neutral_prompt: str,
    target_prompt: str,
    *,
    seeds: Sequence[int] | None = None,
    images: torch.Tensor | None = None,
    latent_shape: Sequence[int] | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    distributed: bool = False,
) -> dict[str, Any]:
    """Trajectories from ``seeds`` (initial noise :func:`~monai_cfx.inferers.seeded_noise`, ``inferer.start ==
    "noise"``) or from ``images`` (``inferer.start == "image"``), in batches, decoded.

    With ``distributed`` (an initialised process group), every process traverses the items ``rank, rank +
    world_size, ...`` and the results are gathered, so that each process returns the whole run in its order.

    Returns:
        ``{"swap_steps", "initial_latent", "neutral_latent", "swap_latents", "frame_latents", "frames",
        "swap_images", "num_model_calls", "num_batches"}``: latents as the inferer gives them (trajectories on dim 1
        for swaps and frames), images ``(K, N, C, *spatial)`` clipped to [0, 1], all on the CPU; the network calls
        (each on a batch) and the batches of all processes.
    """
    _check_prompts(neutral_prompt, target_prompt)
    if (seeds is None) == (images is None):
        raise ValueError("give either `seeds` (traversals from noise) or `images` (traversals of scans), not both.")
    if seeds is not None and inferer.start != "noise":
        raise ValueError(f"`seeds` need an inferer with start='noise', got start={inferer.start!r}.")
    if images is not None and inferer.start != "image":
        raise ValueError(f"`images` need an inferer with start='image', got start={inferer.start!r}.")
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("`seeds` must hold at least one seed.")
        if latent_shape is None:
            raise ValueError("traversals from noise need `latent_shape` (C, *spatial) of the initial latents.")
    rank, world_size = _process_share(distributed)
    if world_size > 1:
        count = len(seeds) if seeds is not None else len(images)  # type: ignore[arg-type]
        if count < world_size:
            raise ValueError(f"a distributed traversal needs at least one item per process, got {count} items for "
                             f"{world_size} processes.")  # fmt: skip
        share = {"seeds": seeds[rank::world_size]} if seeds is not None else {"images": images[rank::world_size]}
        run = traverse(inferer, diffusion_model, autoencoder_model, text_encoder, neutral_prompt, target_prompt,
                       latent_shape=latent_shape, batch_size=batch_size, device=device, **share)  # fmt: skip
        runs: list[Any] = [None] * world_size
        dist.all_gather_object(runs, run)
        return _interleave(runs, count)
    diffusion_model, autoencoder_model = diffusion_model.to(device).eval(), autoencoder_model.to(device).eval()
    contexts = [text_encoder([p]).to(device) for p in (neutral_prompt, target_prompt)]
    empty = text_encoder.null_context(1).to(device)
    count = len(seeds) if seeds is not None else len(images)  # type: ignore[arg-type]
    parts: dict[str, list] = {key: [] for key in _TRAJECTORY_DIM}
    calls = 0
    for start in range(0, count, batch_size):
        if seeds is not None:
            inputs = seeded_noise(latent_shape, seeds[start : start + batch_size], device=device)  # type: ignore
        else:
            inputs = images[start : start + batch_size].to(device)  # type: ignore[index]
        result = inferer(inputs, diffusion_model, autoencoder_model, *contexts, empty)
        calls += result.num_model_calls
        batch = {
            "initial_latent": result.initial_latent,
            "neutral_latent": result.neutral_latent,
            "swap_latents": result.swap_latents,
            "frame_latents": result.frame_latents,
            "frames": inferer.decode(result.frame_latents, autoencoder_model).clamp(0, 1),
            "swap_images": inferer.decode(result.swap_latents, autoencoder_model).clamp(0, 1),
        }
        for key, values in parts.items():
            values.append(batch[key].float().cpu())
    out: dict[str, Any] = {key: torch.cat(parts[key], dim) for key, dim in _TRAJECTORY_DIM.items()}
    out["swap_steps"] = list(inferer.swap_steps)
    out["num_model_calls"] = calls
    out["num_batches"] = -(-count // batch_size)
    return out


def _interleave(runs: Sequence[Mapping[str, Any]], count: int) -> dict[str, Any]:
    """One run from the runs of ``world_size`` processes, process ``r`` having traversed items ``r, r + world_size,
    ...`` of ``count``: the trajectories back in the items' order, the calls and batches summed."""
    world_size = len(runs)
    positions = [index for rank in range(world_size) for index in range(rank, count, world_size)]
    order = torch.as_tensor(np.argsort(positions))
    out: dict[str, Any] = {
        key: torch.cat([run[key] for run in runs], dim).index_select(dim, order) for key, dim in _TRAJECTORY_DIM.items()
    }
    out["swap_steps"] = list(runs[0]["swap_steps"])
    out["num_model_calls"] = sum(run["num_model_calls"] for run in runs)
    out["num_batches"] = sum(run["num_batches"] for run in runs)
    return out


def _probabilities(
    classifier: Any, images: torch.Tensor, device: str | torch.device, batch_size: int = 64
) -> torch.Tensor:
    """Attribute probabilities ``(N, K, A)`` of images ``(K, N, C, *spatial)``: the sigmoid of an oracle's logits
    (a module with ``logits_and_embedding``, e.g. ``FindingClassifier``), or what any other callable
    ``classifier(images) -> probabilities (B, A)`` returns."""
    flat = images.reshape(-1, *images.shape[2:])
    if hasattr(classifier, "logits_and_embedding"):
        probabilities, _ = oracle_predict(classifier, flat, device=device)
    else:
        with torch.no_grad():
            parts = [classifier(flat[i : i + batch_size].to(device)) for i in range(0, len(flat), batch_size)]
        probabilities = torch.cat([torch.as_tensor(part).float().cpu() for part in parts])
        if probabilities.ndim != 2 or probabilities.shape[0] != len(flat):
            raise ValueError(
                f"`classifier` must return probabilities (B, attributes), got shape {tuple(probabilities.shape)} for "
                f"{len(flat)} images."
            )
    return probabilities.reshape(images.shape[0], images.shape[1], -1).transpose(0, 1)


def save_traversal(
    traversal: Mapping[str, Any],
    output_dir: str | os.PathLike,
    names: Sequence[str],
    affines: Sequence[np.ndarray],
    settings: Mapping[str, Any],
    oracle: torch.nn.Module | None = None,
    label_names: Sequence[str] = (),
    strip_frames: int = 10,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    scan_grids: Sequence[Mapping[str, Any]] | None = None,
    preprocessing: Any = None,
) -> dict[str, Any]:
    """Write a :func:`traverse` result into ``output_dir``, all together or not at all (a temporary folder renamed
    at the end; an existing folder is replaced only with ``overwrite``).

    Per trajectory ``<name>``: the frames as NIfTI with the input's affine (2D: one file, frames in the 5th
    dimension; 3D: ``<name>_frame_XX.nii.gz``), the λ sweep likewise (``_swaps``), ``<name>_strip.png`` (frames)
    and ``<name>_swaps.png`` (the sweep; 3D: middle slices), ``<name>.gif`` and ``<name>_latents.pt`` (tensors
    only, readable with ``torch.load(..., weights_only=True)``); and ``traversal.json`` with the settings, the files
    and the oracle's probabilities per frame and per swap. With ``scan_grids`` (each scan's record of
    ``preprocessing``, :func:`~monai_cfx.apps.bundle_io.prepare_scans`) the NIfTI frames and swaps are mapped back
    onto each scan's own grid; the figures and latents stay on the model's grid.

    Returns:
        the record written to ``traversal.json``.
    """
    frames, swaps = traversal["frames"], traversal["swap_images"]
    if len(names) != frames.shape[1] or len(affines) != frames.shape[1]:
        raise ValueError(f"give one name and one affine per trajectory ({frames.shape[1]}), got {len(names)} and "
                         f"{len(affines)}.")  # fmt: skip
    spatial_dims = frames.ndim - 3
    frame_probabilities = swap_probabilities = None
    if oracle is not None:
        frame_probabilities = _probabilities(oracle, frames, device)
        swap_probabilities = _probabilities(oracle, swaps, device)
    swap_steps = list(traversal["swap_steps"])
    shown = np.unique(np.linspace(0, frames.shape[0] - 1, min(strip_frames, frames.shape[0])).round().astype(int))
    records = []
    with atomic_directory(output_dir, overwrite) as folder:
        for index, (name, affine) in enumerate(zip(names, affines)):
            files: dict[str, Any] = {}
            for key, images in (("frames", frames[:, index]), ("swaps", swaps[:, index])):
                # (K, *spatial): the K frames as channels, so one inverse maps them all onto the scan's grid
                volumes = images[:, 0]
                if scan_grids is not None and preprocessing is not None:
                    volumes = to_scan_grid(volumes, scan_grids[index], preprocessing).as_tensor()
                if spatial_dims == 2:
                    files[key] = f"{name}_{key}.nii.gz"
                    write_nifti(volumes.numpy(), affine, folder / files[key])
                else:
                    label = "frame" if key == "frames" else "swap"
                    steps = range(len(images)) if key == "frames" else swap_steps
                    files[key] = [f"{name}_{label}_{step:02d}.nii.gz" for step in steps]
                    for volume, file in zip(volumes, files[key]):
                        write_nifti(volume[None].numpy(), affine, folder / file)
            files["strip"], files["swaps_png"], files["gif"] = f"{name}_strip.png", f"{name}_swaps.png", f"{name}.gif"
            route = f"{settings.get('neutral_prompt')} -> {settings.get('target_prompt')}"
            plot_image_strip(frames[shown, index], [f"frame {k}" for k in shown], folder / files["strip"],
                             suptitle=f"{name}: {route}")  # fmt: skip
            plot_image_strip(
                torch.cat([frames[:1, index], swaps[:, index]]),
                ["neutral"] + [f"λ = {step}" for step in swap_steps],
                folder / files["swaps_png"],
                suptitle=f"{name}: prompt swapped at step λ",
            )
            save_trajectory_gif(frames[:, index], folder / files["gif"])
            files["latents"] = f"{name}_latents.pt"
            latents = {
                key: traversal[key][index] if traversal[key].ndim == frames.ndim - 1 else traversal[key][:, index]
                for key in ("initial_latent", "neutral_latent", "swap_latents", "frame_latents")
            }
            torch.save({**{k: v.clone() for k, v in latents.items()}, "swap_steps": torch.tensor(swap_steps)},
                       folder / files["latents"])  # fmt: skip
            record: dict[str, Any] = {"name": name, "files": files}
            if frame_probabilities is not None:
                record["frame_probabilities"] = {
                    label: frame_probabilities[index, :, k].tolist() for k, label in enumerate(label_names)
                }
                record["swap_probabilities"] = {
                    label: dict(zip(map(str, swap_steps), swap_probabilities[index, :, k].tolist()))  # type: ignore
                    for k, label in enumerate(label_names)
                }
            records.append(record)
        manifest = {"settings": dict(settings), "swap_steps": swap_steps, "trajectories": records}
        manifest["num_model_calls"] = traversal.get("num_model_calls")
        write_json(manifest, folder / "traversal.json")
    return manifest


def _pair_name(pair: Mapping[str, Any]) -> str:
    return str(pair.get("name") or pair["finding"])


@torch.no_grad()
def evaluate_traversal(
    inferer: TrajectoryTraversalInferer,
    diffusion_model: torch.nn.Module,
    autoencoder_model: torch.nn.Module,
    text_encoder: Any,
    oracle: torch.nn.Module,
    label_names: Sequence[str],
    pairs: Sequence[Mapping[str, Any]],
    *,
    kind: str,
    latent_shape: Sequence[int],
    image_size: int,
    num_seeds: int = 64,
    seed: int = 0,
    bezier_window: Sequence[int] = (30, 50),
    swap_window: Sequence[int] = (5, 15),
    num_reference_images: int = 128,
    scan_inferer: TrajectoryTraversalInferer | None = None,
    num_scans: int = 0,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    classifier: Any = None,
    distributed: bool = False,
) -> dict[str, Any]:
    """Measure traversals over ``num_seeds`` seeds for each attribute pair (arXiv 2503.23623 and beyond).

    Per pair ``{"finding", "neutral_prompt", "target_prompt"}``:

    - ``cfrt_bezier``: CFRT on the Bézier frames in ``bezier_window``; ``cfrt_swaps``: CFRT on the swap images
      whose λ lies in ``swap_window`` (inclusive), each against the neutral image;
    - ``cosine``: the latent-direction cosine per λ (mean over seeds), reference the latest swap;
    - ``neutral_free``: the fraction of neutral images without the finding (p < 0.5); ``earliest_has``: with it
      at the earliest swap (p > 0.5);
    - Bézier against linear frames (linear: straight from ``z_N`` to the earliest swap): the fraction of frames
      along which the finding's probability is monotone, and FID of all frames against held-out phantoms of
      ``kind`` on the oracle's features;
    - identity: SSIM and L1 of every frame to the neutral image, mean per frame and over ``bezier_window``;
    - with ``scan_inferer`` (``start="image"``) and ``num_scans``: traversals of held-out healthy phantoms (seeds
      ``seed + 50_000 + i``): SSIM of the λ-latest swap to the input, and the fraction with the finding at the
      earliest swap.

    The attribute probabilities come from ``classifier`` when given (any callable ``images -> probabilities
    (B, A)`` in ``label_names`` order), else from the oracle; FID always uses the oracle's embeddings.

    With ``distributed`` (an initialised process group) the processes share the traversals and gather them
    (:func:`traverse`); every process then measures the whole run, and :func:`write_evaluation` writes on rank 0.

    Returns:
        ``{"num_seeds", "settings", "pairs": {name: {...}}}``.
    """
    label_names = list(label_names)
    judge = oracle if classifier is None else classifier
    # every choice is checked before the first (minutes-long) traversal
    start, end = (int(v) for v in bezier_window)
    if not 1 <= start < end <= inferer.num_frames:
        raise ValueError(
            f"`bezier_window` must be (start, end) with 1 <= start < end <= {inferer.num_frames} (the frames), "
            f"got {tuple(bezier_window)}."
        )
    low, high = swap_window
    if not any(low <= step <= high for step in inferer.swap_steps):
        raise ValueError(f"`swap_window` {tuple(swap_window)} holds none of the swap steps {inferer.swap_steps}.")
    unknown = [pair.get("finding") for pair in pairs if pair.get("finding") not in label_names]
    if not pairs or unknown:
        raise ValueError(f"`pairs` must name findings of the classifier {label_names}, got {unknown or pairs!r}.")
    seeds = list(range(seed, seed + num_seeds))
    reference = torch.stack(
        [
            torch.as_tensor(generate_phantom(kind, 90_000 + seed + i, size=image_size)["image"], dtype=torch.float32)
            for i in range(num_reference_images)
        ]
    )
    results: dict[str, Any] = {}
    for pair in pairs:
        finding = pair["finding"]
        target = label_names.index(finding)
        start = time.perf_counter()
        run = traverse(inferer, diffusion_model, autoencoder_model, text_encoder, pair["neutral_prompt"],
                       pair["target_prompt"], seeds=seeds, latent_shape=latent_shape, batch_size=batch_size,
                       device=device, distributed=distributed)  # fmt: skip
        seconds = time.perf_counter() - start
        swap_steps = run["swap_steps"]
        frames = run["frames"]  # (F, N, C, ...)
        frame_probabilities = _probabilities(judge, frames, device)  # (N, F, A)
        swap_probabilities = _probabilities(judge, run["swap_images"], device)  # (N, Λ, A)
        cfrt_bezier, _ = compute_cfrt(frame_probabilities, target, bezier_window)
        in_window = [k for k, step in enumerate(swap_steps) if low <= step <= high]
        swap_trajectory = torch.cat([frame_probabilities[:, :1], swap_probabilities[:, in_window]], dim=1)
        cfrt_swaps, _ = compute_cfrt(swap_trajectory, target, frame_window=None)
        cosine = compute_latent_direction_cosine(run["neutral_latent"], run["swap_latents"])
        linear_latents = linear_path(run["neutral_latent"], run["swap_latents"][-1], frames.shape[0])
        linear_frames = inferer.decode(linear_latents.to(device), autoencoder_model.to(device)).clamp(0, 1).cpu()
        linear_probabilities = _probabilities(judge, linear_frames, device)
        distances = {
            name: distribution_distances(images.reshape(-1, *images.shape[2:]), reference, oracle, device, seed=seed)
            for name, images in (("bezier", frames), ("linear", linear_frames))
        }
        identity = compute_identity_preservation(frames, frames[0])
        window = slice(*bezier_window)
        record: dict[str, Any] = {
            "finding": finding,
            "neutral_prompt": pair["neutral_prompt"],
            "target_prompt": pair["target_prompt"],
            "swap_steps": swap_steps,
            "cfrt_bezier": cfrt_bezier,
            "cfrt_swaps": cfrt_swaps,
            "cosine": [float(v) for v in cosine.nanmean(dim=1)],
            "neutral_free": float((frame_probabilities[:, 0, target] < 0.5).double().mean()),
            "earliest_has": float((swap_probabilities[:, -1, target] > 0.5).double().mean()),
            "swap_has": [float(v) for v in (swap_probabilities[:, :, target] > 0.5).double().mean(0)],
            "bezier_monotone": float(compute_monotone_fraction(frame_probabilities[:, :, target]).mean()),
            "linear_monotone": float(compute_monotone_fraction(linear_probabilities[:, :, target]).mean()),
            "bezier_fid": distances["bezier"]["fid"],
            "linear_fid": distances["linear"]["fid"],
            "bezier_target_probability": [float(v) for v in frame_probabilities[:, :, target].mean(0)],
            "linear_target_probability": [float(v) for v in linear_probabilities[:, :, target].mean(0)],
            "identity_ssim": [float(v) for v in identity["ssim"].mean(1)],
            "identity_l1": [float(v) for v in identity["l1"].mean(1)],
            "identity_ssim_window": float(identity["ssim"][window].mean()),
            "identity_l1_window": float(identity["l1"][window].mean()),
            "model_calls_per_trajectory": run["num_model_calls"] / run["num_batches"],
            "seconds": seconds,
        }
        if scan_inferer is not None and num_scans > 0:
            scans = torch.stack(
                [
                    torch.as_tensor(
                        generate_phantom(kind, 50_000 + seed + i, size=image_size, findings=[])["image"],
                        dtype=torch.float32,
                    )
                    for i in range(num_scans)
                ]
            )
            scan_run = traverse(scan_inferer, diffusion_model, autoencoder_model, text_encoder,
                                pair["neutral_prompt"], pair["target_prompt"], images=scans, batch_size=batch_size,
                                device=device, distributed=distributed)  # fmt: skip
            latest = scan_run["swap_images"][0]
            ssim = compute_identity_preservation(latest[None], scans)["ssim"][0]
            # the autoencoder's own round trip bounds how close any decoded latent can come to the input
            with torch.no_grad():
                autoencoder_model = autoencoder_model.to(device)
                reconstruction = autoencoder_model.decode_stage_2_outputs(
                    encode_mean(autoencoder_model, scans.to(device))
                ).clamp(0, 1)
            floor = compute_identity_preservation(reconstruction.cpu()[None], scans)["ssim"][0]
            scan_probabilities = _probabilities(judge, scan_run["swap_images"], device)
            record["scan"] = {
                "num_scans": num_scans,
                "latest_swap_ssim_to_input": float(ssim.mean()),
                "neutral_ssim_to_input": float(
                    compute_identity_preservation(scan_run["frames"][:1], scans)["ssim"][0].mean()
                ),
                "earliest_has": float((scan_probabilities[:, -1, target] > 0.5).double().mean()),
                "autoencoder_ssim_to_input": float(floor.mean()),
                "guidance_scale": scan_inferer.guidance_scale,
            }
        results[_pair_name(pair)] = record
    return {
        "num_seeds": num_seeds,
        "settings": {
            "num_inference_steps": inferer.num_inference_steps,
            "guidance_scale": inferer.guidance_scale,
            "swap_steps": list(inferer.swap_steps),
            "num_frames": inferer.num_frames,
            "bezier_window": list(bezier_window),
            "swap_window": list(swap_window),
            "seed": seed,
        },
        "pairs": results,
    }


def write_evaluation(
    metrics: Mapping[str, Any], output_dir: str | os.PathLike, overwrite: bool = False, distributed: bool = False
) -> None:
    """``metrics.json`` and ``traversal_curves.png`` of :func:`evaluate_traversal`, together or not at all; with
    ``distributed``, by rank 0 alone (every process holds the same metrics)."""
    if _process_share(distributed)[0] != 0:
        return
    with atomic_directory(output_dir, overwrite) as folder:
        plot_traversal_curves(metrics, Path(folder) / "traversal_curves.png")
        write_json(dict(metrics), Path(folder) / "metrics.json")
