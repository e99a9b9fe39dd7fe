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
"""What the inference bundles check before any model is loaded: the datalist, every item, the output folder and
the command line's overrides. Each refusal names the file, item or key, what was found and what was expected."""

from __future__ import annotations

import difflib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

__all__ = [
    "check_cli_overrides",
    "check_in_distribution",
    "check_output_dir",
    "load_datalist",
    "merge_rank_manifests",
    "prepare_scans",
    "scan_names",
    "to_scan_grid",
    "validate_items",
]

# the MONAI CLI's own arguments of `python -m monai.bundle run`, which are not config keys
_CLI_ARGUMENTS = {"config_file", "meta_file", "logging_file", "run_id", "init_id", "final_id", "tracking", "args_file"}


def load_datalist(
    datalist: str | os.PathLike,
    data_list_key: str = "testing",
    base_dir: str | os.PathLike | None = None,
    path_keys: Sequence[str] = ("image",),
    text_keys: Sequence[str] = ("prompt",),
    required_keys: Sequence[str] = ("image",),
) -> list[dict[str, Any]]:
    """Read a MONAI (Decathlon-style) datalist strictly.

    Unlike ``monai.data.load_decathlon_datalist``, which joins any value that happens to resolve to an existing
    path onto ``base_dir`` (an empty string becomes the dataset folder), only ``path_keys`` are paths, and they
    must be non-empty strings. ``text_keys`` must be strings; an empty one is dropped (the config's default is
    used, as the docs say). Other keys pass unchanged.

    Raises:
        FileNotFoundError: the datalist does not exist.
        ValueError: it is not JSON, lacks ``data_list_key``, the list is empty, or an item breaks the rules above
            (the message names the datalist, the item's index and the key).
    """
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"`datalist` {str(path)!r} not found.")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"`datalist` {str(path)!r} is not valid JSON: {error}.") from error
    if not isinstance(content, Mapping) or data_list_key not in content:
        found = sorted(content) if isinstance(content, Mapping) else type(content).__name__
        raise ValueError(f"`datalist` {str(path)!r} has no {data_list_key!r} list (`data_list_key`); found {found}.")
    items = content[data_list_key]
    if not isinstance(items, list) or not items:
        raise ValueError(
            f"`datalist` {str(path)!r}: {data_list_key!r} must be a non-empty list of items, got {items!r}."
        )
    base = Path(base_dir) if base_dir is not None else path.parent
    loaded = []
    for index, item in enumerate(items):
        where = f"`datalist` {str(path)!r} item {index} of {data_list_key!r}"
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, Mapping):
            raise ValueError(f"{where} must be an object with an 'image' path, got {item!r}.")
        item = dict(item)
        for key in required_keys:
            if key not in item:
                raise ValueError(f"{where} has no {key!r} key (keys: {sorted(item)}).")
        for key in path_keys:
            if key not in item:
                continue
            value = item[key]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty file path, got {value!r}.")
            item[key] = str(base / value) if not os.path.isabs(value) else value
        for key in text_keys:
            if key not in item:
                continue
            value = item[key]
            if value is None or (isinstance(value, str) and not value.strip()):
                del item[key]  # the config's default prompt
            elif not isinstance(value, str):
                raise ValueError(f"{where}: {key!r} must be one string, got {value!r}.")
        loaded.append(item)
    return loaded


def _transform_all(items: Sequence[Mapping[str, Any]], transform: Callable[[Any], Any], image_key: str) -> list[Any]:
    """``transform`` of every item, refusing an empty list and naming the item whose preprocessing fails (with the
    transform's own message: MONAI wraps transform errors in ``RuntimeError`` chains)."""
    if not items:
        raise ValueError("no items to run: the datalist's list is empty (or `num_items` is 0).")
    transformed = []
    for index, item in enumerate(items):
        try:
            transformed.append(transform(dict(item)))
        except Exception as error:  # noqa: BLE001 - re-raised with the item named
            root = error
            while root.__cause__ is not None:
                root = root.__cause__
            raise ValueError(
                f"item {index} ({item.get(image_key)!r}) cannot be used: {type(root).__name__}: {root}"
            ) from error
    return transformed


def _check_reconstructions(images: Any, autoencoder: Any, max_reconstruction_mse: float | None) -> None:
    """:func:`~monai_cfx.engines.check_reconstruction` of each model input ``(C, *spatial)`` of ``images`` (its
    MetaTensor keeps the file name for the message); nothing with ``max_reconstruction_mse=None``."""
    if max_reconstruction_mse is None or autoencoder is None:
        return
    from monai_cfx.engines import check_reconstruction

    device = next(autoencoder.parameters()).device
    for image in images:
        check_reconstruction(autoencoder, image[None].to(device), max_reconstruction_mse)


def validate_items(
    items: Sequence[Mapping[str, Any]], transform: Callable[[Any], Any], image_key: str = "image"
) -> list[Mapping[str, Any]]:
    """Run ``transform`` (the preprocessing) on every item before any model is loaded, so that a bad item stops the
    run before anything is computed or written. Returns ``items`` unchanged.

    Raises:
        ValueError: the list is empty, or an item's preprocessing failed; the message names the item's file and
            keeps the transform's own message (MONAI wraps transform errors in ``RuntimeError`` chains).
    """
    _transform_all(items, transform, image_key)
    return list(items)


def check_in_distribution(
    items: Sequence[Mapping[str, Any]],
    transform: Callable[[Any], Any],
    autoencoder: Any,
    max_reconstruction_mse: float | None,
    image_key: str = "image",
) -> None:
    """Refuse, before any output, the items whose preprocessed image the autoencoder cannot reconstruct within
    ``max_reconstruction_mse`` (:func:`~monai_cfx.engines.check_reconstruction`): images that are not scans of the
    kind the model was trained on. Runs after :func:`validate_items`, so that only the autoencoder is loaded.

    Raises:
        ValueError: naming the first refused item's file and its error.
    """
    if max_reconstruction_mse is None:
        return
    images = (transform(dict(item))[image_key] for item in items)  # one at a time: large datasets stay out of memory
    _check_reconstructions(images, autoencoder, max_reconstruction_mse)


def prepare_scans(
    items: Sequence[Mapping[str, Any]],
    preprocessing: Callable[[Any], Any],
    autoencoder: Any = None,
    max_reconstruction_mse: float | None = None,
    image_key: str = "image",
    scan_key: str = "scan",
) -> dict[str, Any]:
    """Bring every item's scan to the model's input with ``preprocessing`` (e.g.
    :func:`~monai_cfx.transforms.scan_preprocessing`), once, for the bundles that hold their inputs in memory
    (explanations, traversals). A bad item is refused as by :func:`validate_items`; with an ``autoencoder`` and a
    ``max_reconstruction_mse`` the model inputs go through the out-of-distribution check of
    :func:`check_in_distribution`.

    Returns:
        ``{"images": (N, C, *model spatial), "prepared": [item dicts], "names": [unique file stems],
        "affines": [scan affines]}``: ``prepared[i]`` holds the model input (with the transforms' record, for
        :func:`to_scan_grid`) and the scan in model intensity units under ``scan_key``.
    """
    import numpy as np
    import torch

    prepared = _transform_all(items, preprocessing, image_key)
    _check_reconstructions([item[image_key] for item in prepared], autoencoder, max_reconstruction_mse)
    names = scan_names(items, image_key)
    images = torch.stack([torch.as_tensor(item[image_key]).float() for item in prepared])
    affines = [np.asarray(item[scan_key].affine, dtype=float) for item in prepared]
    return {"images": images, "prepared": prepared, "names": names, "affines": affines}


def scan_names(items: Sequence[Mapping[str, Any]], image_key: str = "image") -> list[str]:
    """The output names of a datalist's scans: each file's stem, or ``<index>_<stem>`` for all when two collide."""
    names = [Path(str(item[image_key])).name.split(".")[0] for item in items]
    if len(set(names)) < len(names):
        names = [f"{index:03d}_{name}" for index, name in enumerate(names)]  # file stems must not collide
    return names


def to_scan_grid(output: Any, prepared: Mapping[str, Any], preprocessing: Any, image_key: str = "image") -> Any:
    """Map a model-grid output ``(C, *model spatial)`` of one item (any number of channels: an image, a map, the
    frames of a trajectory) back onto that item's scan grid with MONAI's ``Invertd`` and the item's own record of
    ``preprocessing`` (:func:`prepare_scans`): the scan's shape, orientation and affine."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    reference = prepared[image_key]
    output = MetaTensor(torch.as_tensor(output).float().cpu(), meta=dict(reference.meta))
    inverted = Invertd(keys="output", transform=preprocessing, orig_keys=image_key, nearest_interp=False)(
        {image_key: reference, "output": output}
    )
    return inverted["output"]


def check_output_dir(
    output_dir: str | os.PathLike, overwrite: bool = False, manifest_names: Sequence[str] = ()
) -> Path:
    """Check before any model loads that ``output_dir`` can receive this run's outputs.

    Raises:
        NotADirectoryError: ``output_dir`` (or a parent) is a file.
        PermissionError: it cannot be created or written.
        FileExistsError: one of ``manifest_names`` is there from an earlier run and ``overwrite`` is off.
    """
    path = Path(output_dir)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"`output_dir` {str(path)!r}: {str(parent)!r} is a file, not a folder.")
            try:  # a real probe: permission bits say nothing for root or on read-only file systems
                tempfile.TemporaryDirectory(dir=parent, prefix=".monai_cfx_probe.").cleanup()
            except OSError as error:
                raise PermissionError(
                    f"`output_dir` {str(path)!r}: folder {str(parent)!r} is not writable ({error.strerror})."
                ) from error
            break
    for name in manifest_names:
        if (path / name).exists() and not overwrite:
            raise FileExistsError(
                f"output file {str(path / name)!r} exists (an earlier run's); choose another `output_dir` or pass "
                "--overwrite true."
            )
    return path


def _config_keys(config_files: Sequence[str]) -> set[str]:
    keys: set[str] = set()
    for name in config_files:
        content = ConfigParser.load_config_file(name)
        keys.update(str(key) for key in content)
    return keys


def check_cli_overrides(argv: Sequence[str] | None = None) -> None:
    """Refuse ``--key value`` overrides of ``python -m monai.bundle run`` that no config of the run uses.

    MONAI's CLI adds an unknown key silently, so ``--noise_strenght 0.2`` would run with the default strength.
    Nested ids (``--diffusion_def#channels``) are checked by their first part. Does nothing outside a MONAI
    bundle command line (e.g. when a config is parsed from Python).

    Raises:
        ValueError: naming the unknown key and the closest known ones.
    """
    argv = list(sys.argv if argv is None else argv)
    if "--config_file" not in argv:
        return
    config_file = argv[argv.index("--config_file") + 1]
    try:
        names = json.loads(config_file.replace("'", '"')) if config_file.lstrip().startswith("[") else [config_file]
    except json.JSONDecodeError:
        return  # a config_file value this check cannot read; MONAI reports it itself
    known = _config_keys(names) | _CLI_ARGUMENTS | {"bundle_root", "_meta_"}
    for argument in argv:
        if not argument.startswith("--") or argument == "--":
            continue
        key = argument[2:].split("=", 1)[0].split("#", 1)[0]
        if key and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else "."
            raise ValueError(f"override --{key} is not a key of the configs {names}{hint}")


def merge_rank_manifests(
    output_dir: str | os.PathLike,
    manifest_name: str,
    item_order: Sequence[Any] = (),
    world_size: int | None = None,
    overwrite: bool = False,
) -> Path | None:
    """Merge the per-rank manifests of a multi-process run (``<manifest_name>_rank<r>.json``, written by each rank's
    :class:`~monai_cfx.handlers.ItemSaver`) into ``<manifest_name>.json``, in the order of ``item_order`` (the input
    paths of the run's items; records of other inputs follow in rank order), and remove the rank files: the folder
    then holds what a one-process run writes; ``None`` when no rank saved items (an evaluation that writes only its
    metrics). Call it on one rank, after every rank finished (a barrier).

    Raises:
        FileNotFoundError: when a rank's manifest is missing (that rank did not finish).
    """
    from monai_cfx.utils import check_writable, write_json

    output_dir = Path(output_dir)
    if world_size is None:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    parts = [output_dir / f"{manifest_name}_rank{rank}.json" for rank in range(world_size)]
    missing = [str(p) for p in parts if not p.is_file()]
    if len(missing) == len(parts):
        return None  # the run saved no items (an evaluation without --save_outputs)
    if missing:
        raise FileNotFoundError(f"the per-rank manifests {missing} are missing: a rank of the run did not finish.")
    target = output_dir / f"{manifest_name}.json"
    check_writable(target, overwrite)
    records = [record for part in parts for record in json.loads(part.read_text())]
    position = {str(image): index for index, image in enumerate(item_order)}
    records.sort(key=lambda record: position.get(str(record.get("image")), len(position)))  # stable
    write_json(records, target, overwrite=overwrite)
    for part in parts:
        part.unlink()
    return target
