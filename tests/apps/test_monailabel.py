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
"""The MONAI Label infer tasks, in-process with MONAI Label's own ``InferTask`` base (``pip install --no-deps
monailabel==0.8.5``; nothing of MONAI Label is stubbed), on the shipped weights and a phantom NIfTI on its own grid."""

from __future__ import annotations

import os
import tempfile
import unittest

import nibabel as nib
import numpy as np

from monai_cfx.apps.monailabel import HAS_MONAILABEL, bundle_infer_tasks
from monai_cfx.data import generate_phantom
from monai_cfx.utils import write_nifti
from tests.helpers import BUNDLES, TempFolderCase


@unittest.skipUnless(HAS_MONAILABEL, "monailabel is not installed (scripts/setup_env.sh dev installs it)")
class TestMonaiLabelTasks(TempFolderCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        from monailabel.interfaces.tasks.infer_v2 import InferTask

        cls.InferTask = InferTask
        cls.tasks = bundle_infer_tasks(BUNDLES, dims=(2,), overrides={"device": "cpu"})
        cls.affine = np.diag([0.7, 0.7, 1.0, 1.0])  # the user's own grid, not the phantoms'
        subject = generate_phantom("chest", 7100, size=128, findings=["effusion"])
        cls.scan = str(cls.tmp / "patient.nii.gz")
        write_nifti(subject["image"], cls.affine, cls.scan)
        write_nifti(np.zeros((1, 40, 40), dtype=np.float32), cls.affine, cls.tmp / "small.nii.gz")
        cls.mask = subject["mask"][0] > 0

    def check_label(self, label, channels):
        saved = nib.load(label)
        self.assertEqual(saved.shape[:2], (128, 128))  # worked at 64², written back on the scan's grid
        np.testing.assert_allclose(saved.affine, self.affine)
        values = np.asarray(saved.dataobj).reshape(128, 128, -1)
        self.assertEqual(values.shape[-1], channels)
        self.assertTrue(np.isfinite(values).all())
        return values

    def test_contract(self):
        self.assertEqual(sorted(self.tasks), ["counterfactual_2d", "grounding_2d"])
        for task in self.tasks.values():
            self.assertIsInstance(task, self.InferTask)
            self.assertTrue(task.is_valid())
            self.assertEqual(task.info()["dimension"], 2)
        missing = bundle_infer_tasks(self.tmp / "no_bundles", dims=(2,))
        self.assertFalse(missing["grounding_2d"].is_valid())

    def test_counterfactual_difference_map(self):
        before = set(os.listdir(tempfile.gettempdir()))
        label, result = self.tasks["counterfactual_2d"]({"image": self.scan, "device": "cpu"})
        # the label is the one thing a request leaves behind, and MONAI Label's server deletes it once sent
        self.assertEqual(set(os.listdir(tempfile.gettempdir())) - before, {os.path.basename(label)})
        self.assertTrue(label.endswith(".nii.gz"))
        difference = self.check_label(label, 1)[..., 0]
        os.unlink(label)
        self.assertEqual(result["prompt"], "Normal chest radiograph.")
        self.assertNotIn("output_dir", result)
        self.assertEqual(result["difference"], "patient_difference.nii.gz")
        # the map is where the effusion is: its mean inside the finding well above outside
        self.assertGreater(difference[self.mask].mean(), 2 * difference[~self.mask].mean())

    def test_grounding_heatmap(self):
        request = {
            "image": self.scan,
            "phrase": "right pleural effusion",
            "prompt": "Chest radiograph with a right pleural effusion.",
        }
        label, result = self.tasks["grounding_2d"](request)
        heatmap = self.check_label(label, 1)[..., 0]
        os.unlink(label)
        self.assertEqual(result["phrases"], ["right pleural effusion"])
        self.assertGreater(heatmap[self.mask].mean(), heatmap[~self.mask].mean())

    def test_bad_requests_are_refused_with_nothing_written(self):
        before = set(os.listdir(tempfile.gettempdir()))
        cases = [
            ({}, "request field 'image'"),
            ({"image": str(self.tmp / "missing.nii.gz")}, "missing.nii.gz"),
            ({"image": self.scan, "noise_strength": "$__import__('os')"}, "config expressions are refused"),
            ({"image": str(self.tmp / "small.nii.gz")}, "small.nii.gz"),  # the bundle's own refusal
        ]
        for request, message in cases:
            with self.subTest(request=request), self.assertRaises(Exception) as raised:
                self.tasks["counterfactual_2d"](request)
            self.assertIn(message, str(raised.exception))
        self.assertEqual(set(os.listdir(tempfile.gettempdir())) - before, set())


if __name__ == "__main__":
    unittest.main()
