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
result dict)``) and runs the bundle's ``configs/inference.json`` unchanged through
:class:`~monai_cfx.apps.bundle_runner.BundleRunner`: the same scan chain (any size, NIfTI, DICOM, PNG), the same
refusals, the same writers, with the request's image as a one-item datalist; the networks are built once. Requires
``monailabel`` (``pip install --no-deps monailabel==0.8.5`` beside monai_cfx on a CPU machine; see the README)::

    from monai_cfx.apps.monailabel import bundle_infer_tasks

    tasks = bundle_infer_tasks("bundles")  # {"counterfactual_2d": ..., "grounding_2d": ..., ... 3d}
    label, result = tasks["grounding_2d"]({"image": "/data/cxr.nii.gz", "phrase": "right pleural effusion"})
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.utils import optional_import

from monai_cfx.apps.bundle_runner import BundleRunner, bundle_runners

InferTask, HAS_MONAILABEL = optional_import("monailabel.interfaces.tasks.infer_v2", name="InferTask")
InferType, _ = optional_import("monailabel.interfaces.tasks.infer_v2", name="InferType")

__all__ = ["BundleInferTask", "bundle_infer_tasks", "HAS_MONAILABEL"]

_DESCRIPTIONS = {
    "counterfactual": "healthy counterfactual of the scan and its difference map (monai_cfx counterfactual bundle)",
    "grounding": "where a phrase is in the scan: cross-attention heat maps (monai_cfx phrase grounding bundle)",
}


def _base_class() -> type:
    if not HAS_MONAILABEL:
        raise ImportError(
            "monai_cfx.apps.monailabel needs MONAI Label: pip install --no-deps monailabel==0.8.5 (its other "
            "dependencies pull a CUDA torch and torchvision; the infer tasks need none of them)."
        )
    return InferTask  # type: ignore[return-value]


def BundleInferTask(  # noqa: N802 (a class factory: MONAI Label may be absent at import time)
    runner: BundleRunner, labels: Sequence[str] | None = None, dimension: int = 2, description: str = ""
) -> Any:
    """A MONAI Label ``InferTask`` that runs ``runner`` (a bundle folder's configs) on the request's image and
    returns ``(label path, result)``: the label is a file of its own in the temporary folder, which MONAI Label's
    server deletes once sent; the run's other outputs are not kept (``result`` names them). ``labels``,
    ``dimension`` and ``description`` are MONAI Label's task info."""
    base = _base_class()

    class _Task(base):  # type: ignore[misc, valid-type]
        def is_valid(self) -> bool:
            return runner.is_valid()

        def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
            label, result = runner(request)
            # MONAI Label's server deletes the label file it is given once sent, nothing else: keep only that file
            # and remove the run's temporary folder, so that each request leaves nothing behind
            work = Path(result.pop("output_dir")).parent
            suffix = "".join(Path(label).suffixes)
            fd, kept = tempfile.mkstemp(prefix=f"monai_cfx_{runner.bundle_dir.name}_{runner.label_key}_", suffix=suffix)
            os.close(fd)
            try:
                shutil.move(label, kept)
            except BaseException:
                os.unlink(kept)
                raise
            finally:
                shutil.rmtree(work, ignore_errors=True)
            return kept, result

    _Task.__name__ = _Task.__qualname__ = "BundleInferTask"
    task = _Task(
        InferType.OTHERS, list(labels or []), dimension, description, config={"bundle": str(runner.bundle_dir)}
    )
    task.runner = runner
    return task


def bundle_infer_tasks(
    bundles_dir: str | os.PathLike, dims: Sequence[int] = (2, 3), overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The MONAI Label tasks of this library's bundles under ``bundles_dir``, for ``init_infers`` of an app:
    ``counterfactual_<d>d`` (label: the difference map; request fields ``prompt``, ``noise_strength``,
    ``guidance_scale``, ``healthy_prompt``) and ``grounding_<d>d`` (label: the heat maps, one channel per phrase;
    request fields ``phrase`` or ``phrases`` and ``prompt``)."""
    tasks = {}
    for name, runner in bundle_runners(bundles_dir, dims, overrides).items():
        method, dims_tag = name.rsplit("_", 1)
        tasks[name] = BundleInferTask(runner, [runner.label_key], int(dims_tag[0]), _DESCRIPTIONS[method])
    return tasks
