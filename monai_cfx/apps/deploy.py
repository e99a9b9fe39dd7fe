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
"""MONAI Deploy App SDK operators built from a bundle folder: counterfactuals (with difference maps) and phrase
grounding, each running the bundle's own configs through :class:`~monai_cfx.apps.bundle_runner.BundleRunner`.

MONAI Deploy's stock ``MonaiBundleInferenceOperator`` cannot take these bundles (it expects one TorchScript
``model.ts`` or ``model.pt``, a ``Compose`` postprocessing and ``inferer(inputs, network)`` with one network); these
operators take the bundle folder instead. Three operators make an application (``tutorials/deploy_app``):

- :class:`ScanPathsOperator`: the scans of the application's input folder (NIfTI, PNG or JPEG files, and DICOM series
  folders, or the input folder itself when it holds one series);
- :class:`BundleOperator`: runs a bundle on each scan and writes its outputs (NIfTI on the scan's own grid, PNG,
  the bundle's JSON record) into ``<output folder>/<scan name>/``;
- :class:`ResultsWriterOperator`: writes every scan's record into one JSON file.

Requires ``monai-deploy-app-sdk`` (4.0: ``pip install monai-deploy-app-sdk==4.0.0 highdicom``; highdicom is needed
by the SDK's DICOM modules, which MONAI imports once the SDK is installed, but is not declared by it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.utils import optional_import

from monai_cfx.apps.bundle_runner import BundleRunner, bundle_runners
from monai_cfx.handlers.saving import file_stem
from monai_cfx.utils import write_json

_core, HAS_DEPLOY = optional_import("monai.deploy.core")
_BASE: Any = _core.Operator if HAS_DEPLOY else object

__all__ = [
    "HAS_DEPLOY",
    "ScanPathsOperator",
    "BundleOperator",
    "ResultsWriterOperator",
    "bundle_operator",
    "scan_paths",
]

SCAN_SUFFIXES = (".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".dcm")


def _require_deploy() -> None:
    if not HAS_DEPLOY:
        raise ImportError(
            "monai_cfx.apps.deploy needs the MONAI Deploy App SDK: pip install monai-deploy-app-sdk==4.0.0 highdicom."
        )


def _is_dicom_folder(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() == ".dcm" for p in folder.iterdir() if p.is_file())


def scan_paths(input_path: str | os.PathLike) -> list[Path]:
    """The scans of ``input_path``: the path itself when it is a scan file or a DICOM series folder, else its scan
    files and DICOM series subfolders, sorted by name.

    Raises:
        FileNotFoundError: when ``input_path`` does not exist or holds no scan.
    """
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"input path {str(path)!r} does not exist.")
    if path.is_file() or _is_dicom_folder(path):
        return [path]
    scans = sorted(
        p
        for p in path.iterdir()
        if (p.is_file() and p.name.lower().endswith(SCAN_SUFFIXES) and p.suffix.lower() != ".dcm")
        or _is_dicom_folder(p)
    )
    if not scans:
        raise FileNotFoundError(
            f"input folder {str(path)!r} holds no scan (NIfTI, PNG or JPEG files, or DICOM series folders)."
        )
    return scans


class ScanPathsOperator(_BASE):  # type: ignore[misc, valid-type]
    """Emits the list of scans of ``input_folder`` (:func:`scan_paths`) on ``image_paths``."""

    def __init__(self, fragment: Any, *args: Any, input_folder: str | os.PathLike, **kwargs: Any) -> None:
        _require_deploy()
        self.input_folder = Path(input_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: Any) -> None:
        spec.output("image_paths")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        op_output.emit([str(p) for p in scan_paths(self.input_folder)], "image_paths")


class BundleOperator(_BASE):  # type: ignore[misc, valid-type]
    """Runs ``runner`` (a bundle folder's configs) on every scan it receives on ``image_paths``, with the fixed
    request fields ``request`` (e.g. ``{"phrase": "right pleural effusion"}``); writes each scan's outputs into
    ``output_folder/<scan name>/`` (refused if it exists) and emits the records on ``results``."""

    def __init__(
        self,
        fragment: Any,
        *args: Any,
        runner: BundleRunner,
        output_folder: str | os.PathLike,
        request: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        _require_deploy()
        self.runner, self.output_folder, self.request = runner, Path(output_folder), dict(request or {})
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: Any) -> None:
        spec.input("image_paths")
        spec.output("results")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        results = []
        for path in op_input.receive("image_paths"):
            path = Path(path)
            label, record = self.runner({**self.request, "image": str(path)}, self.output_folder / file_stem(path))
            self._logger.info(f"{self.runner.bundle_dir.name}: {path.name} -> {label}")
            results.append({"scan": str(path), "label": label, **record})
        op_output.emit(results, "results")


class ResultsWriterOperator(_BASE):  # type: ignore[misc, valid-type]
    """Writes the records received on ``results`` into ``output_folder/filename`` (atomically; an existing file is
    refused)."""

    def __init__(
        self, fragment: Any, *args: Any, output_folder: str | os.PathLike, filename: str, **kwargs: Any
    ) -> None:
        _require_deploy()
        self.path = Path(output_folder) / filename
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: Any) -> None:
        spec.input("results")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        write_json(op_input.receive("results"), self.path)


def bundle_operator(
    fragment: Any,
    method: str,
    bundles_dir: str | os.PathLike,
    output_folder: str | os.PathLike,
    *,
    dims: int = 2,
    request: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> BundleOperator:
    """A :class:`BundleOperator` of this library's ``method`` (``"counterfactual"`` or ``"grounding"``) bundle
    under ``bundles_dir`` (:func:`~monai_cfx.apps.bundle_runner.bundle_runners`), for ``dims`` 2 or 3."""
    runners = bundle_runners(bundles_dir, dims=(dims,), overrides=overrides)
    key = f"{method}_{dims}d"
    if key not in runners:
        raise ValueError(f"`method` must be 'counterfactual' or 'grounding' and `dims` 2 or 3, got {method!r}, {dims}.")
    return BundleOperator(fragment, runner=runners[key], output_folder=output_folder, request=request, name=name or key)
