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
"""A MONAI Deploy application: the scans of the input folder (NIfTI, PNG, JPEG or DICOM series folders) through
monai_cfx's counterfactual and phrase grounding bundles (see README.md here):

    python tutorials/deploy_app/app.py -i /data/scans -o /data/out

Writes ``<output>/counterfactual/<scan>/`` and ``<output>/grounding/<scan>/`` (NIfTI on each scan's own grid, PNG,
the bundles' JSON records) and one summary per method, ``counterfactuals.json`` and ``grounding.json``. The phrase
to ground is ``MONAI_CFX_PHRASE`` (default: right pleural effusion); ``MONAI_CFX_BUNDLES`` is the bundles folder
(default: this repository's) and ``MONAI_CFX_DIMS`` 2 or 3.
"""

from __future__ import annotations

import os
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from monai_cfx.apps.deploy import ResultsWriterOperator, ScanPathsOperator, bundle_operator

DEFAULT_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


class CounterfactualGroundingApp(Application):
    """ScanPathsOperator -> BundleOperator (counterfactual, grounding) -> ResultsWriterOperator, per method."""

    def compose(self):
        context = Application.init_app_context(self.argv)
        input_folder, output = Path(context.input_path), Path(context.output_path)
        bundles = Path(os.environ.get("MONAI_CFX_BUNDLES") or DEFAULT_BUNDLES)
        dims = int(os.environ.get("MONAI_CFX_DIMS", "2"))
        phrase = os.environ.get("MONAI_CFX_PHRASE", "right pleural effusion")
        scans = ScanPathsOperator(self, CountCondition(self, 1), input_folder=input_folder, name="scans")
        methods = {"counterfactual": ({}, "counterfactuals.json"), "grounding": ({"phrase": phrase}, "grounding.json")}
        for method, (request, summary) in methods.items():
            run = bundle_operator(self, method, bundles, output / method, dims=dims, request=request)
            writer = ResultsWriterOperator(self, output_folder=output, filename=summary, name=f"{method}_summary")
            self.add_flow(scans, run, {("image_paths", "image_paths")})
            self.add_flow(run, writer, {("results", "results")})


if __name__ == "__main__":
    CounterfactualGroundingApp().run()
