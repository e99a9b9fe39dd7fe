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
"""The MONAI Deploy operators in the example application (tutorials/deploy_app), run in-process by the SDK's own
executor on two phantom NIfTI scans of other sizes and grids than the model's, and the scan discovery."""

from __future__ import annotations

import importlib.util
import json
import sys
import unittest

import nibabel as nib
import numpy as np

from monai_cfx.apps.deploy import HAS_DEPLOY, scan_paths
from monai_cfx.data import generate_phantom
from monai_cfx.utils import write_nifti
from tests.helpers import REPO_ROOT, TempFolderCase


class TestScanPaths(TempFolderCase):
    def test_files_and_dicom_series_folders(self):
        folder = self.tmp / "inputs"
        (folder / "series_1").mkdir(parents=True)
        (folder / "series_1" / "slice_0.dcm").write_bytes(b"")
        (folder / "notes").mkdir()
        for name in ("b.nii.gz", "a.png", "readme.txt"):
            (folder / name).write_bytes(b"")
        self.assertEqual([p.name for p in scan_paths(folder)], ["a.png", "b.nii.gz", "series_1"])
        self.assertEqual(scan_paths(folder / "series_1"), [folder / "series_1"])  # one series given directly
        with self.assertRaisesRegex(FileNotFoundError, "holds no scan"):
            scan_paths(folder / "notes")
        with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
            scan_paths(folder / "missing")


@unittest.skipUnless(HAS_DEPLOY, "the MONAI Deploy App SDK is not installed (pip install monai-deploy-app-sdk==4.0.0)")
class TestDeployApplication(TempFolderCase):
    def test_counterfactual_and_grounding_app(self):
        spec = importlib.util.spec_from_file_location("deploy_app", REPO_ROOT / "tutorials" / "deploy_app" / "app.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        inputs, outputs = self.tmp / "scans", self.tmp / "out"
        inputs.mkdir()
        grids = {"patient_a": (128, np.diag([0.7, 0.7, 1.0, 1.0])), "patient_b": (96, np.diag([0.9, 0.9, 1.0, 1.0]))}
        masks = {}
        for index, (name, (size, affine)) in enumerate(grids.items()):
            subject = generate_phantom("chest", 7200 + index, size=size, findings=["effusion"])
            write_nifti(subject["image"], affine, inputs / f"{name}.nii.gz")
            masks[name] = subject["mask"][0] > 0
        module.CounterfactualGroundingApp([sys.executable, "app.py", "-i", str(inputs), "-o", str(outputs)]).run()
        for method, summary, key in (
            ("counterfactual", "counterfactuals.json", "difference"),
            ("grounding", "grounding.json", "heatmap"),
        ):
            records = json.loads((outputs / summary).read_text())
            self.assertEqual([r["scan"] for r in records], [str(inputs / f"{n}.nii.gz") for n in grids])
            for record, (name, (size, affine)) in zip(records, grids.items()):
                saved = nib.load(outputs / method / name / record[key])
                self.assertEqual(saved.shape[:2], (size, size))  # on the scan's own grid
                np.testing.assert_allclose(saved.affine, affine)
                values = np.asarray(saved.dataobj).reshape(size, size)
                # both maps point at the effusion: higher inside the finding than outside
                self.assertGreater(values[masks[name]].mean(), values[~masks[name]].mean(), (method, name))
            if method == "grounding":
                self.assertEqual(records[0]["phrases"], ["right pleural effusion"])


if __name__ == "__main__":
    unittest.main()
