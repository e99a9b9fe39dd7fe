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
"""Run a bundle folder's own inference configs on one scan at a time, from a server or an operator: the networks
and the text encoder are built once, on the first call, and every call runs the bundle's chain unchanged (any size,
NIfTI, DICOM, PNG; the same refusals and writers) with the scan as a one-item datalist. The MONAI Label tasks
(:mod:`monai_cfx.apps.monailabel`) and the MONAI Deploy operators (:mod:`monai_cfx.apps.deploy`) are built on it.

    from monai_cfx.apps.bundle_runner import bundle_runners

    runners = bundle_runners("bundles", dims=(2,))
    label, record = runners["grounding_2d"]({"image": "/data/cxr.nii.gz", "phrase": "right pleural effusion"})
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_cfx.apps.bundle_config import load_bundle_config
from monai_cfx.utils import write_json

__all__ = ["BundleRunner", "bundle_runners", "CACHED_IDS"]

# built once and shared by every call; the ids a bundle does not define are skipped
CACHED_IDS = ("load_diffusion", "load_autoencoder", "load_oracle", "text_encoder", "scale_factor")
# the ids a request may never set: they are the runner's own, or would let a request run code
_RESERVED = {"datalist", "dataset_dir", "data_list_key", "output_dir", "overwrite", "bundle_root", *CACHED_IDS}


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


class BundleRunner:
    """A bundle folder's configs, run on one scan per call.

    Args:
        bundle_dir: the bundle folder (``bundles/counterfactual``, ``bundles/phrase_grounding`` or a copy).
        config_files: configs merged in order, relative to ``bundle_dir`` (add ``configs/3d.json`` for volumes).
        records_file: the manifest the bundle's saver writes (``counterfactuals.json``, ``grounding.json``).
        label_key: the record's file returned as the label (``difference``, ``heatmap``).
        item_fields: request field -> datalist item key (e.g. ``{"phrase": "phrases", "prompt": "prompt"}``).
        settings: request fields passed as config overrides (plain values only, e.g. ``noise_strength``).
        overrides: config overrides of every call (e.g. ``{"device": "cpu"}``).
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        *,
        config_files: Sequence[str] = ("configs/inference.json",),
        records_file: str,
        label_key: str,
        item_fields: Mapping[str, str],
        settings: Sequence[str] = (),
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir).resolve()
        self.config_files = list(config_files)
        self.records_file, self.label_key = records_file, label_key
        self.item_fields, self.settings = dict(item_fields), list(settings)
        reserved = sorted(_RESERVED & set(self.settings))
        if reserved:
            raise ValueError(f"`settings` {reserved} are set by the runner itself and cannot come from a request.")
        self.overrides = dict(overrides or {})
        self._cache: dict[str, Any] | None = None

    def is_valid(self) -> bool:
        """The bundle's configs exist (the weights are checked when the first call builds the networks)."""
        return all((self.bundle_dir / name).is_file() for name in self.config_files)

    def networks(self) -> dict[str, Any]:
        """The bundle's networks, text encoder and scale factor, built on the first call."""
        if self._cache is None:
            parser = load_bundle_config(self.bundle_dir, self.config_files, **self.overrides)
            self._cache = {i: parser.get_parsed_content(i) for i in CACHED_IDS if i in parser}
        return self._cache

    def __call__(
        self, request: Mapping[str, Any], output_dir: str | os.PathLike | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Run the bundle on ``request["image"]`` (a file or DICOM folder path) with the request's item fields and
        settings; returns the path of the label NIfTI (on the image's own grid) and the bundle's record of it.

        Args:
            request: ``image`` and the runner's item fields and settings; other fields are ignored.
            output_dir: where the bundle writes (refused if it exists); default: a new temporary folder.

        Raises:
            ValueError: for a request without an image or with a value that is not plain, and the bundle's refusals.
            FileNotFoundError: when the image does not exist.
        """
        image = request.get("image")
        if not isinstance(image, (str, os.PathLike)) or not str(image):
            raise ValueError(f"request field 'image' must be the path of a scan, got {image!r}.")
        if not os.path.exists(image):
            raise FileNotFoundError(f"request field 'image': {str(image)!r} does not exist.")
        item: dict[str, Any] = {"image": os.path.abspath(image)}
        for field, key in self.item_fields.items():
            if request.get(field) not in (None, "", []):
                item[key] = _plain(field, request[field])
        settings = {k: _plain(k, request[k]) for k in self.settings if k in request and request[k] is not None}
        networks = self.networks()
        # the datalist lives in its own temporary folder; the outputs appear all together or not at all
        work = Path(tempfile.mkdtemp(prefix=f"monai_cfx_{self.bundle_dir.name}_"))
        output = Path(output_dir) if output_dir is not None else work / "output"
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
                output_dir=str(output),
                overwrite=False,
            )
            for expression in ("initialize", "run", "finalize"):
                if expression in parser:
                    parser.get_parsed_content(expression)
        except BaseException as error:
            shutil.rmtree(work, ignore_errors=True)
            # MONAI's parser wraps a refusal in "Failed to evaluate <expression>": the caller gets the refusal
            cause: BaseException = error
            while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
                cause = cause.__cause__
            if cause is error:
                raise
            raise cause.with_traceback(cause.__traceback__) from None
        if output_dir is not None:
            shutil.rmtree(work, ignore_errors=True)
        records = json.loads((output / self.records_file).read_text())
        record = records[0] if isinstance(records, list) else records
        result = {"bundle": self.bundle_dir.name, "output_dir": str(output), **record}
        return str(output / record[self.label_key]), result


def bundle_runners(
    bundles_dir: str | os.PathLike, dims: Sequence[int] = (2, 3), overrides: Mapping[str, Any] | None = None
) -> dict[str, BundleRunner]:
    """The runners of this library's counterfactual and grounding bundles under ``bundles_dir``:
    ``counterfactual_<d>d`` (label: the difference map; request fields ``prompt``, ``noise_strength``,
    ``guidance_scale``, ``healthy_prompt``) and ``grounding_<d>d`` (label: the heat maps, one channel per phrase;
    request fields ``phrase`` or ``phrases`` and ``prompt``)."""
    bundles_dir = Path(bundles_dir)
    runners: dict[str, BundleRunner] = {}
    for dims_tag in dims:
        extra = ["configs/3d.json"] if dims_tag == 3 else []
        runners[f"counterfactual_{dims_tag}d"] = BundleRunner(
            bundles_dir / "counterfactual",
            config_files=["configs/inference.json", *extra],
            records_file="counterfactuals.json",
            label_key="difference",
            item_fields={"prompt": "prompt"},
            settings=("noise_strength", "guidance_scale", "healthy_prompt"),
            overrides=overrides,
        )
        runners[f"grounding_{dims_tag}d"] = BundleRunner(
            bundles_dir / "phrase_grounding",
            config_files=["configs/inference.json", *extra],
            records_file="grounding.json",
            label_key="heatmap",
            item_fields={"phrase": "phrases", "phrases": "phrases", "prompt": "prompt"},
            overrides=overrides,
        )
    return runners
