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
"""Atomic, non-clobbering output writers: every file this library writes goes through here."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_directory",
    "atomic_path",
    "check_writable",
    "save_figure",
    "write_json",
    "write_metrics",
    "write_nifti",
    "write_png",
]


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Return ``path`` as a ``Path`` after checking that writing it would not clobber a user's file.

    Raises:
        FileExistsError: when ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output file {str(path)!r} exists; pass overwrite=True to replace it.")
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it onto ``path`` only if the block succeeds.

    The rename is atomic on POSIX file systems, so readers never see a half-written file and a failure
    leaves neither a partial file nor a damaged previous version behind.

    Example::

        with atomic_path("out/image.nii.gz") as tmp:
            nib.save(img, tmp)
    """
    path = check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the full suffix (e.g. ".nii.gz") so that writers which dispatch on the extension still work
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not overwrite and path.exists():
            raise FileExistsError(f"output file {str(path)!r} appeared while writing; not overwriting it.")
        # mkstemp creates the file as 0600; give it the permissions a plain open() would have
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; move it onto ``path`` only if the block succeeds: a run's outputs
    appear all together or not at all, and a failed or killed run leaves no partial folder at ``path``.

    Raises:
        FileExistsError: when ``path`` exists (checked before the block and again at the end) and ``overwrite`` is
            False; with ``overwrite`` the previous folder is replaced only after the new one is complete.

    Example::

        with atomic_directory("out/traversal") as tmp:
            write_json(record, tmp / "traversal.json")
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output folder {str(path)!r} exists; pass overwrite=True to replace it.")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output folder {str(path)!r} is a file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"output folder {str(path)!r} appeared while writing; not overwriting it.")
            previous = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, previous / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(previous / path.name, path)  # the previous folder comes back if the new one cannot
                raise
            finally:
                shutil.rmtree(previous)  # the old folder, or nothing once it has come back
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _write_with(path: str | os.PathLike, writer: Callable[[Path], Any], overwrite: bool) -> Path:
    with atomic_path(path, overwrite) as tmp:
        writer(tmp)
    return Path(path)


def save_figure(figure: Any, path: str | os.PathLike, overwrite: bool = False, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it (figures hold memory until closed)."""
    import matplotlib.pyplot as plt

    try:
        return _write_with(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"), overwrite)
    finally:
        plt.close(figure)


def write_json(obj: Any, path: str | os.PathLike, overwrite: bool = False, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically."""
    text = json.dumps(obj, indent=indent)
    return _write_with(path, lambda tmp: tmp.write_text(text + "\n"), overwrite)


def write_metrics(
    metrics: Mapping[str, Any],
    path: str | os.PathLike,
    settings: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write an evaluator's ``state.metrics`` (scalars; per-image lists under ``per_image``) with the run's
    settings as JSON, atomically; returns what was written. NaN (an undefined mean) is written as null."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    record = {"settings": dict(settings or {}), **{k: clean(v) for k, v in metrics.items()}}
    write_json(record, path, overwrite=overwrite)
    return record


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a channel-first array ``(C, *spatial)`` as NIfTI with ``affine`` (4x4, RAS), atomically.

    A single channel is squeezed so that 3D Slicer and ITK-SNAP read the file as a plain image;
    several channels are stored in the 5th NIfTI dimension, as MONAI's ``NibabelWriter`` does.
    """
    import nibabel as nib

    array = np.asarray(array)
    if array.shape[0] == 1:
        data = array[0]
    else:
        spatial = array.shape[1:] + (1,) * (4 - array.ndim)
        data = np.moveaxis(array, 0, -1).reshape(*spatial, 1, array.shape[0])
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    return _write_with(path, lambda tmp: nib.save(image, str(tmp)), overwrite)


def write_png(array: np.ndarray, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a 2D channel-first array in ``[0, 1]`` as an 8-bit PNG, atomically.

    The array follows MONAI's convention (spatial dim 0 is the image's horizontal axis), so it is
    transposed before writing; MONAI's ``LoadImage`` reads the file back to the same orientation.
    """
    from PIL import Image

    array = np.asarray(array)
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"write_png expects a (1|3, W, H) array, got shape {tuple(array.shape)}.")
    pixels = np.clip(np.rint(np.moveaxis(array, 0, -1).swapaxes(0, 1) * 255.0), 0, 255).astype(np.uint8)
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    return _write_with(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"), overwrite)
