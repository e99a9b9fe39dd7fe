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
"""Shared pieces of the handlers that save an evaluator's items: item iteration, file stems and the manifest."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import CommonKeys, IgniteInfo, min_version, optional_import

from monai_cfx.utils import check_writable, write_json

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

logger = logging.getLogger(__name__)

__all__ = ["ItemSaver", "affine_of", "item_stem", "iterate_items", "to_numpy"]


def iterate_items(engine: Engine) -> list[dict[str, Any]]:
    """The evaluator's items of this iteration: each decollated output merged over its batch item."""
    outputs, batches = engine.state.output, engine.state.batch
    if isinstance(outputs, Mapping):
        raise ValueError("the handler needs decollated outputs: keep the evaluator's `decollate=True`.")
    # outputs win (the prediction, post-processed keys), except where the evaluator had nothing to put
    return [
        {**dict(batch), **{k: v for k, v in dict(output).items() if v is not None}}
        for batch, output in zip(batches, outputs)
    ]


def file_stem(path: str | os.PathLike) -> str:
    """The file name of ``path`` without its image suffix (``.nii.gz`` as one suffix)."""
    name = os.path.basename(str(path))
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".dcm", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def item_stem(item: Mapping[str, Any], key: str, fallback: str) -> str:
    """The file name of ``item[key]`` without its image suffix, or ``fallback`` when it has none."""
    image = item.get(key)
    name = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
    return file_stem(name) if name else fallback


def affine_of(image: Any) -> np.ndarray:
    """The image's affine (identity when it carries none)."""
    if isinstance(image, MetaTensor):
        return np.asarray(image.affine, dtype=np.float64)
    return np.eye(4)


def to_numpy(value: Any) -> np.ndarray:
    return torch.as_tensor(value).detach().cpu().float().numpy()


class ItemSaver:
    """Base of the handlers that write files for every item of an evaluator's run and list them in a manifest.

    Subclasses implement :meth:`save_item`, which returns the item's manifest record (and appends it to
    ``records``). File stems come from the input's file name (:meth:`unique_stem`); ``<manifest_name>.json``
    (``<manifest_name>_rank<r>.json`` in multi-process runs, where each rank saves its own items) is written at the
    end of the run. An existing manifest stops the run at its start unless ``overwrite``.

    Attached to an evaluator, a run is all or nothing: items are written into a hidden staging folder beside
    ``output_dir`` (``.<name>.<manifest_name>.partial``) and moved into ``output_dir`` only when the run completes.
    A run that fails leaves nothing in ``output_dir``. A killed run leaves its staging folder, which the next run
    with the same items and ``run_settings`` resumes (:meth:`pending` gives the items still to do); a run with
    other items or settings removes it first. Called directly (``save_item``, ``write_manifest``), files go
    straight into ``output_dir``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        manifest_name: str,
        image_key: str = CommonKeys.IMAGE,
        overwrite: bool = False,
        run_settings: Mapping[str, Any] | None = None,
        intensity_key: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.intensity_key = intensity_key
        self.manifest_name = manifest_name
        self.image_key = image_key
        self.overwrite = overwrite
        self.run_settings = dict(run_settings or {})
        self.records: list[dict[str, Any]] = []
        self.used_stems: set[str] = set()
        self.write_dir = self.output_dir
        self._run_fingerprint: str | None = None  # set by pending(): the items and settings of this run
        self._resumed = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finalize)

    def _suffix(self) -> str:
        return "" if idist.get_world_size() == 1 else f"_rank{idist.get_rank()}"

    def _manifest_path(self, folder: Path | None = None) -> Path:
        return (folder or self.output_dir) / f"{self.manifest_name}{self._suffix()}.json"

    @property
    def staging_dir(self) -> Path:
        """The hidden folder beside ``output_dir`` that a run writes into until it completes."""
        return self.output_dir.parent / f".{self.output_dir.name}.{self.manifest_name}{self._suffix()}.partial"

    def _fingerprint(self, items: Sequence[Mapping[str, Any]]) -> str:
        text = json.dumps(
            {"items": [str(i.get(self.image_key)) for i in items], "settings": self.run_settings},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def pending(self, items: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The items a run still has to do: all of them, or, after a killed run of the same items and settings
        (its staging folder holds the finished items), those it had not finished. A staging folder of other items
        or settings is removed."""
        fingerprint, staging = self._fingerprint(items), self.staging_dir
        progress = staging / "progress.json"
        self._run_fingerprint, self._resumed, self.records, self.used_stems = fingerprint, False, [], set()
        if staging.exists():
            try:
                state = json.loads(progress.read_text())
            except (OSError, ValueError):
                state = {}
            if state.get("fingerprint") == fingerprint:
                self.records = list(state["records"])
                self.used_stems = set(state["stems"])
                self._resumed, self.write_dir = True, staging
                logger.warning(
                    "resuming an unfinished run: %d of %d items already done in %s",
                    len(self.records),
                    len(items),
                    staging,
                )
            else:
                logger.warning("removing an unfinished run of other items or settings: %s", staging)
                shutil.rmtree(staging)
        done = {str(record["image"]) for record in self.records}
        return [item for item in items if str(item.get(self.image_key)) not in done]

    def _started(self, engine: Engine) -> None:
        check_writable(self._manifest_path(), self.overwrite)
        if not self._resumed:
            self.records, self.used_stems = [], set()
            if self.staging_dir.exists():
                shutil.rmtree(self.staging_dir)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.write_dir = self.staging_dir

    def __call__(self, engine: Engine) -> None:
        rank = f"rank{idist.get_rank()}_" if idist.get_world_size() > 1 else ""
        for item in iterate_items(engine):
            self.save_item(item, fallback_stem=f"{rank}item_{len(self.records):05d}")
        if self.write_dir == self.staging_dir:
            state = {"fingerprint": self._run_fingerprint, "records": self.records, "stems": sorted(self.used_stems)}
            write_json(state, self.staging_dir / "progress.json", overwrite=True)

    def save_item(self, item: Mapping[str, Any], fallback_stem: str = "item") -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement save_item.")

    def new_record(
        self,
        item: Mapping[str, Any],
        required_keys: Sequence[str],
        fallback_stem: str,
        fields: Mapping[str, Any],
        files: Mapping[str, str],
        png: tuple[str, str] | None = None,
    ) -> tuple[dict[str, Any], list[Path]]:
        """Start an item's manifest record and check its files before any is written.

        The record holds the input's name, ``fields``, one ``<stem><suffix>`` per entry of ``files`` and, for 2D
        images, ``png`` (key, suffix). Returns the record and the paths to write (in the staging folder during a
        run) in that order.

        Raises:
            ValueError: when the item lacks one of ``required_keys`` (the image's included).
            FileExistsError: when a file exists in ``output_dir`` and ``overwrite`` is off.
        """
        for key in (self.image_key, *required_keys):
            if key not in item:
                raise ValueError(f"the item has no {str(key)!r} key (keys: {sorted(item)}); check the postprocessing.")
        image = item[self.image_key]
        stem = self.unique_stem(item, fallback_stem)
        record: dict[str, Any] = {
            "image": str(image.meta.get("filename_or_obj", stem)) if isinstance(image, MetaTensor) else stem,
            **fields,
            **{key: f"{stem}{suffix}" for key, suffix in files.items()},
        }
        if png is not None and torch.as_tensor(image).ndim - 1 == 2:
            record[png[0]] = f"{stem}{png[1]}"
        keys = [*files, *([png[0]] if png is not None and png[0] in record else [])]
        for key in keys:
            check_writable(self.output_dir / record[key], self.overwrite)
        return record, [self.write_dir / record[key] for key in keys]

    def intensity_field(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """``{"intensity": [lo, hi, target_lo, target_hi]}`` when the item carries its intensity rule's parameters:
        an output ``y`` in the model's units is ``lo + (y - target_lo) * (hi - lo) / (target_hi - target_lo)``."""
        if self.intensity_key is None or item.get(self.intensity_key) is None:
            return {}
        return {"intensity": [float(v) for v in torch.as_tensor(item[self.intensity_key]).flatten()]}

    def unique_stem(self, item: Mapping[str, Any], fallback_stem: str) -> str:
        """The input's file name, prefixed by its folder (then a counter) when an earlier item had the same name,
        as in datasets with one folder per subject and a shared file name (``s0001/ct.nii.gz``)."""
        stem = item_stem(item, self.image_key, fallback_stem)
        image = item.get(self.image_key)
        source = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
        if stem in self.used_stems and source:
            stem = f"{os.path.basename(os.path.dirname(str(source)))}_{stem}".lstrip("_")
        base, counter = stem, 1
        while stem in self.used_stems:
            stem, counter = f"{base}_{counter}", counter + 1
        self.used_stems.add(stem)
        return stem

    def _finalize(self, _engine: Engine) -> None:
        self.complete()

    def complete(self) -> Path:
        """Write the manifest and, during a run, move every staged file into ``output_dir`` (all checked first)."""
        if self.write_dir != self.staging_dir:
            return self.write_manifest()
        self.write_manifest()
        staged = [path for path in sorted(self.staging_dir.iterdir()) if path.name != "progress.json"]
        for path in staged:
            check_writable(self.output_dir / path.name, self.overwrite)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for path in staged:
            os.replace(path, self.output_dir / path.name)
        shutil.rmtree(self.staging_dir)
        self.write_dir, self._resumed, self._run_fingerprint = self.output_dir, False, None
        return self._manifest_path()

    def write_manifest(self) -> Path:
        """Write the records of the saved items; the evaluator calls it at the end of the run."""
        return write_json(self.records, self._manifest_path(self.write_dir), overwrite=self.overwrite)
