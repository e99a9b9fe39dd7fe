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
"""MONAI datasets and on-disk datalists of phantom subjects."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset, MetaTensor

from monai_cfx.utils import check_option, check_writable, write_json, write_nifti, write_png

from .brain import brain_phantom
from .chest import chest_phantom

__all__ = [
    "PHANTOM_KINDS",
    "PhantomDataset",
    "ensure_phantom_datalist",
    "generate_phantom",
    "phantom_affine",
    "subject_to_item",
    "write_phantom_dataset",
]

PHANTOM_KINDS = ("chest", "brain")
_DEFAULT_SIZE = {"chest": 128, "brain": 64}
_IMAGE_KEYS = ("image", "healthy", "mask")


def generate_phantom(kind: str, seed: int, size: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Dispatch to :func:`chest_phantom` or :func:`brain_phantom` by ``kind``."""
    check_option("kind", kind, PHANTOM_KINDS)
    size = _DEFAULT_SIZE[kind] if size is None else size
    return chest_phantom(seed, size, **kwargs) if kind == "chest" else brain_phantom(seed, size, **kwargs)


class PhantomDataset(Dataset):
    """A MONAI ``Dataset`` whose item ``i`` is the phantom subject with seed ``seed + i``, made on the fly.

    Images (``image``, ``healthy``, ``mask``) are ``MetaTensor``\\ s carrying the subject's affine, so
    MONAI transforms (``Spacingd``, ``Orientationd``, ``SaveImaged``) treat them like loaded scans;
    ``label`` is the multi-hot float tensor; ``report``, ``phrases``, ``boxes``, ``attributes`` are
    passed through for text conditioning and grounding.

    Args:
        kind: ``"chest"`` (2D) or ``"brain"`` (3D).
        num: number of subjects.
        seed: seed of the first subject.
        size: image side (default 128 for chest, 64 for brain).
        transform: MONAI transform applied to each item dict.
        phantom_kwargs: passed to the generator (``findings``, ``domain``, ``age`` for brain).

    Example::

        from monai.data import DataLoader
        loader = DataLoader(PhantomDataset("chest", num=64, seed=1000), batch_size=8)
        batch = next(iter(loader))  # batch["image"]: (8, 1, 128, 128), batch["report"]: list of 8 strings
    """

    def __init__(
        self,
        kind: str,
        num: int,
        seed: int = 0,
        size: int | None = None,
        transform: Callable | None = None,
        **phantom_kwargs: Any,
    ) -> None:
        check_option("kind", kind, PHANTOM_KINDS)
        if not isinstance(num, int) or num < 1:
            raise ValueError(f"`num` must be a positive int, got {num!r}.")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
        self.kind, self.seed, self.size, self.phantom_kwargs = kind, seed, size, phantom_kwargs
        super().__init__(data=list(range(seed, seed + num)), transform=transform)

    def _transform(self, index: int) -> Any:
        subject = generate_phantom(self.kind, self.data[index], self.size, **self.phantom_kwargs)
        item = subject_to_item(subject, self.data[index])
        return item if self.transform is None else self.transform(item)


def phantom_affine(kind: str = "chest", size: int | None = None) -> np.ndarray:
    """The 4x4 affine (orientation and spacing) of ``kind`` phantoms of ``size``: the space generated images live in."""
    return generate_phantom(kind, 0, size, findings=[])["affine"]


def subject_to_item(subject: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Convert a generator's output to a MONAI item dict (MetaTensors with affine, tensor label)."""
    affine = torch.as_tensor(subject["affine"], dtype=torch.float64)
    item: dict[str, Any] = {
        key: MetaTensor(torch.from_numpy(subject[key]), affine=affine.clone(), meta={"seed": seed})
        for key in _IMAGE_KEYS
    }
    item["label"] = torch.from_numpy(subject["labels"])
    for key in ("report", "phrases", "boxes", "attributes", "label_names", "findings"):
        item[key] = subject[key]
    item["seed"] = seed
    return item


def _write_subject(
    seed: int, kind: str, size: int | None, out_dir: Path, overwrite: bool, phantom_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    subject = generate_phantom(kind, seed, size, **phantom_kwargs)
    stem = f"{kind}_{seed:06d}"
    entry: dict[str, Any] = {}
    for key in _IMAGE_KEYS:
        relative = Path("images") / f"{stem}_{key}.nii.gz"
        write_nifti(subject[key], subject["affine"], out_dir / relative, overwrite=overwrite)
        entry[key] = str(relative)
        if kind == "chest":
            png = Path("png") / f"{stem}_{key}.png"
            write_png(subject[key], out_dir / png, overwrite=overwrite)
            entry[f"{key}_png"] = str(png)
    entry.update(
        label=subject["labels"].astype(int).tolist(),
        label_names=subject["label_names"],
        report=subject["report"],
        phrases=subject["phrases"],
        boxes=subject["boxes"],
        attributes=subject["attributes"],
        seed=seed,
    )
    return entry


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    kind: str = "chest",
    num: int = 100,
    seed: int = 0,
    size: int | None = None,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    num_workers: int | None = None,
    overwrite: bool = False,
    **phantom_kwargs: Any,
) -> dict[str, Any]:
    """Write ``num`` phantom subjects as NIfTI (and PNG for 2D) plus a MONAI datalist ``datalist.json``.

    Each datalist item holds relative paths ``image``, ``healthy`` and ``mask`` (resolve them with
    ``monai.data.load_decathlon_datalist(..., base_dir=out_dir)``), the multi-hot ``label``, the
    ``report``, MS-CXR-style ``phrases`` and ``boxes``. Subjects are split in seed order into
    ``training``, ``validation`` and ``testing`` by ``split``. Every file is written atomically and
    existing files are kept unless ``overwrite``.

    Returns:
        a summary with the datalist path, the split sizes and the elapsed seconds.
    """
    check_option("kind", kind, PHANTOM_KINDS)
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"`num` must be a positive int, got {num!r}.")
    split = [float(f) for f in split]
    if len(split) != 3 or min(split) < 0 or not np.isclose(sum(split), 1.0):
        raise ValueError(f"`split` must be three non-negative fractions summing to 1, got {split!r}.")
    out_dir = Path(out_dir)
    datalist_path = check_writable(out_dir / "datalist.json", overwrite)
    # generate one subject first so that bad phantom arguments fail before anything is written
    generate_phantom(kind, seed, size, **phantom_kwargs)
    start = time.perf_counter()
    seeds = list(range(seed, seed + num))
    writer = partial(
        _write_subject, kind=kind, size=size, out_dir=out_dir, overwrite=overwrite, phantom_kwargs=phantom_kwargs
    )
    num_workers = min(os.cpu_count() or 1, 8) if num_workers is None else num_workers
    if num_workers > 1 and num > 1:
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            entries = list(pool.map(writer, seeds, chunksize=max(1, num // (4 * num_workers))))
    else:
        entries = [writer(s) for s in seeds]
    num_train = int(round(split[0] * num))
    num_val = int(round(split[1] * num))
    datalist = {
        "description": f"{kind} phantoms, seeds {seed}..{seed + num - 1}",
        "kind": kind,
        "label_names": entries[0]["label_names"],
        "domain": phantom_kwargs.get("domain") or "source",
        "training": entries[:num_train],
        "validation": entries[num_train : num_train + num_val],
        "testing": entries[num_train + num_val :],
    }
    write_json(datalist, datalist_path, overwrite=overwrite)
    elapsed = time.perf_counter() - start
    return {
        "datalist": str(datalist_path),
        "num_training": num_train,
        "num_validation": num_val,
        "num_testing": num - num_train - num_val,
        "seconds": elapsed,
    }


def ensure_phantom_datalist(
    dataset_dir: str | os.PathLike,
    kind: str = "chest",
    num: int = 1000,
    seed: int = 0,
    size: int | None = None,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    **phantom_kwargs: Any,
) -> str:
    """Return ``dataset_dir/datalist.json``, writing the phantom dataset there first if it does not exist.

    Bundles call this so that they run out of the box on the phantom benchmark; a user's own datalist
    is never touched. An existing phantom datalist of another kind is an error rather than a silent mix.
    """
    datalist = Path(dataset_dir) / "datalist.json"
    if datalist.exists():
        written_kind = json.loads(datalist.read_text()).get("kind", kind)
        if written_kind != kind:
            raise ValueError(f"`dataset_dir` {str(dataset_dir)!r} holds {written_kind!r} phantoms, expected {kind!r}.")
        return str(datalist)
    write_phantom_dataset(dataset_dir, kind, num, seed, size, split=split, **phantom_kwargs)
    return str(datalist)
