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
"""MONAI Label infer tasks built from a bundle folder's own configs: a healthy counterfactual with its difference map,
and phrase-grounding heat maps, one request (one image) at a time.

Each task follows MONAI Label's ``InferTask`` contract (``is_valid``, ``info``, ``__call__(request) -> (label path,
result dict)``) and runs the bundle's ``configs/inference.json`` unchanged: the same scan chain (any size, NIfTI,
DICOM, PNG), the same refusals, the same writers, with the request's image as a one-item datalist. The networks and
the text encoder are built once, on the first request, and reused. Requires ``monailabel`` (``pip install --no-deps
monailabel==0.8.5`` beside monai_cfx on a CPU machine; see the README)::

    from monai_cfx.apps.monailabel import bundle_infer_tasks

    tasks = bundle_infer_tasks("bundles")  # {"counterfactual_2d": ..., "grounding_2d": ..., ... 3d}
    label, result = tasks["grounding_2d"]({"image": "/data/cxr.nii.gz", "phrase": "right pleural effusion"})
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.utils import optional_import

from monai_cfx.apps.bundle_config import load_bundle_config
from monai_cfx.utils import write_json

InferTask, HAS_MONAILABEL = optional_import("monailabel.interfaces.tasks.infer_v2", name="InferTask")
InferType, _ = optional_import("monailabel.interfaces.tasks.infer_v2", name="InferType")

__all__ = ["BundleInferTask", "bundle_infer_tasks", "HAS_MONAILABEL"]

# built once and shared by every request; the ids a bundle does not define are skipped
CACHED_IDS = ("load_diffusion", "load_autoencoder", "load_oracle", "text_encoder", "scale_factor")
# the ids a request may never set: they are the task's own, or would let a request run code
_RESERVED = {"datalist", "dataset_dir", "data_list_key", "output_dir", "overwrite", "bundle_root", *CACHED_IDS}


def _base_class() -> type:
    if not HAS_MONAILABEL:
        raise ImportError(
            "monai_cfx.apps.monailabel needs MONAI Label: pip install --no-deps monailabel==0.8.5 (its other "
            "dependencies pull a CUDA torch and torchvision; the infer tasks need none of them)."
        )
    return InferTask  # type: ignore[return-value]


def _plain(name: str, value: Any) -> Any:
    """A request value as it may reach a config: numbers, booleans and text that MONAI's parser will not evaluate."""
    if isinstance(value, (list, tuple)):
        return [_plain(name, v) for v in value]
    if isinstance(value, bool) or isinstance(value, (int, float)) or value is None:
        return value
    if isinstance(value, str):
        if value[:1] in ("$", "@", "%"):
            raise ValueError(
                f"request field {name!r} must be plain text, got {value!r} (config expressions are refused)."
            )
        return value
    raise ValueError(f"request field {name!r} must be text, a number or a list of them, got {type(value).__name__}.")


class _BundleInferTaskMixin:
    def _setup(
        self,
        bundle_dir: str | os.PathLike,
        config_files: Sequence[str],
        records_file: str,
        label_key: str,
        item_fields: Mapping[str, str],
        settings: Sequence[str],
        overrides: Mapping[str, Any] | None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir).resolve()
        self.config_files = list(config_files)
        self.records_file, self.label_key = records_file, label_key
        self.item_fields, self.settings = dict(item_fields), list(settings)
        reserved = sorted(_RESERVED & set(self.settings))
        if reserved:
            raise ValueError(f"`settings` {reserved} are set by the task itself and cannot come from a request.")
        self.overrides = dict(overrides or {})
        self._cache: dict[str, Any] | None = None

    def is_valid(self) -> bool:
        """The bundle's configs exist (the weights are checked when the first request builds the networks)."""
        return all((self.bundle_dir / name).is_file() for name in self.config_files)

    def _networks(self) -> dict[str, Any]:
        if self._cache is None:
            parser = load_bundle_config(self.bundle_dir, self.config_files, **self.overrides)
            self._cache = {i: parser.get_parsed_content(i) for i in CACHED_IDS if i in parser}
        return self._cache

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Run the bundle on ``request["image"]`` (a file or DICOM folder path) with the request's item fields and
        settings; returns the path of the label NIfTI (on the image's own grid) and the bundle's record of it.

        Raises:
            ValueError: for a request without an image, with an unknown field, or with a value that is not plain.
            FileNotFoundError: when the image does not exist.
        """
        image = request.get("image")
        if not isinstance(image, (str, os.PathLike)) or not str(image):
            raise ValueError(f"request field 'image' must be the path of a scan, got {image!r}.")
        if not os.path.exists(image):
            raise FileNotFoundError(f"request field 'image': {str(image)!r} does not exist.")
        # MONAI Label adds its own bookkeeping fields (device, result_extension, ...); only ours are read
        item: dict[str, Any] = {"image": os.path.abspath(image)}
        for field, key in self.item_fields.items():
            if request.get(field) not in (None, "", []):
                item[key] = _plain(field, request[field])
        settings = {k: _plain(k, request[k]) for k in self.settings if k in request and request[k] is not None}
        networks = self._networks()
        # the request's folder: its label and the bundle's other outputs; removed again if the bundle refuses
        work = Path(tempfile.mkdtemp(prefix=f"monai_cfx_{self.bundle_dir.name}_"))
        output_dir = work / "output"
        try:
            datalist = write_json({"testing": [item]}, work / "datalist.json")
            parser = load_bundle_config(
                self.bundle_dir,
                self.config_files,
                **self.overrides,
                **settings,
                **networks,
                datalist=str(datalist),
                dataset_dir=str(work),
                data_list_key="testing",
                output_dir=str(output_dir),
                overwrite=False,
            )
            for expression in ("initialize", "run", "finalize"):
                if expression in parser:
                    parser.get_parsed_content(expression)
        except BaseException as error:
            shutil.rmtree(work, ignore_errors=True)
            # MONAI's parser wraps a refusal in "Failed to evaluate <expression>": the request gets the refusal
            cause: BaseException = error
            while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
                cause = cause.__cause__
            if cause is error:
                raise
            raise cause.with_traceback(cause.__traceback__) from None
        records = json.loads((output_dir / self.records_file).read_text())
        record = records[0] if isinstance(records, list) else records
        result = {"bundle": self.bundle_dir.name, "output_dir": str(output_dir), **record}
        return str(output_dir / record[self.label_key]), result


def BundleInferTask(  # noqa: N802 (a class factory: MONAI Label may be absent at import time)
    bundle_dir: str | os.PathLike,
    *,
    config_files: Sequence[str] = ("configs/inference.json",),
    records_file: str,
    label_key: str,
    item_fields: Mapping[str, str],
    settings: Sequence[str] = (),
    labels: Sequence[str] | None = None,
    dimension: int = 2,
    description: str = "",
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """A MONAI Label ``InferTask`` that runs a bundle folder's configs on the request's image.

    Args:
        bundle_dir: the bundle folder (``bundles/counterfactual``, ``bundles/phrase_grounding`` or a copy).
        config_files: configs merged in order, relative to ``bundle_dir`` (add ``configs/3d.json`` for volumes).
        records_file: the manifest the bundle's saver writes (``counterfactuals.json``, ``grounding.json``).
        label_key: the record's file returned as the label (``difference``, ``heatmap``).
        item_fields: request field -> datalist item key (e.g. ``{"phrase": "phrases", "prompt": "prompt"}``).
        settings: request fields passed as config overrides (plain values only, e.g. ``noise_strength``).
        labels, dimension, description: MONAI Label's task description.
        overrides: config overrides of every request (e.g. ``{"device": "cpu"}``).
    """
    base = _base_class()

    class _Task(_BundleInferTaskMixin, base):  # type: ignore[misc, valid-type]
        pass

    _Task.__name__ = _Task.__qualname__ = "BundleInferTask"
    task = _Task(InferType.OTHERS, list(labels or []), dimension, description, config={"bundle": str(bundle_dir)})
    task._setup(bundle_dir, config_files, records_file, label_key, item_fields, settings, overrides)
    return task


def bundle_infer_tasks(
    bundles_dir: str | os.PathLike, dims: Sequence[int] = (2, 3), overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The MONAI Label tasks of this library's bundles under ``bundles_dir``, for ``init_infers`` of an app:
    ``counterfactual_<d>d`` (label: the difference map; request fields ``prompt``, ``noise_strength``,
    ``guidance_scale``) and ``grounding_<d>d`` (label: the heat maps, one channel per phrase; request fields
    ``phrase`` or ``phrases`` and ``prompt``)."""
    bundles_dir = Path(bundles_dir)
    tasks: dict[str, Any] = {}
    for dims_tag in dims:
        extra = ["configs/3d.json"] if dims_tag == 3 else []
        tasks[f"counterfactual_{dims_tag}d"] = BundleInferTask(
            bundles_dir / "counterfactual",
            config_files=["configs/inference.json", *extra],
            records_file="counterfactuals.json",
            label_key="difference",
            item_fields={"prompt": "prompt"},
            settings=("noise_strength", "guidance_scale", "healthy_prompt"),
            labels=["difference"],
            dimension=dims_tag,
            description="healthy counterfactual of the scan and its difference map (monai_cfx counterfactual bundle)",
            overrides=overrides,
        )
        tasks[f"grounding_{dims_tag}d"] = BundleInferTask(
            bundles_dir / "phrase_grounding",
            config_files=["configs/inference.json", *extra],
            records_file="grounding.json",
            label_key="heatmap",
            item_fields={"phrase": "phrases", "phrases": "phrases", "prompt": "prompt"},
            labels=["heatmap"],
            dimension=dims_tag,
            description="where a phrase is in the scan: cross-attention heat maps (monai_cfx phrase grounding bundle)",
            overrides=overrides,
        )
    return tasks
