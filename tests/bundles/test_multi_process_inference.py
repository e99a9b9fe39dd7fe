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
"""Sharded inference (configs/multi_gpu_inference.json) with torchrun and gloo on the CPU: two processes write
the same files as one process, with the same manifest in datalist order and the same images within float rounding."""

from __future__ import annotations

import json
import socket
import sys

import nibabel as nib
import numpy as np
from parameterized import parameterized

from monai_cfx.data import ensure_phantom_datalist, generate_phantom
from monai_cfx.utils import write_json, write_nifti
from tests.helpers import BUNDLES, TempFolderCase, check_ok, run_relocated


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TestMultiProcessInference(TempFolderCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        data = cls.tmp / "scans"
        data.mkdir()
        items = []
        for index, finding in enumerate(("effusion", "cardiomegaly", "effusion")):  # 3 items: ranks get 2 and 1
            subject = generate_phantom("chest", 7300 + index, size=64, findings=[finding])
            write_nifti(subject["image"], np.diag([0.8, 0.8, 1.0, 1.0]), data / f"case_{index}.nii.gz")
            phrase = "right pleural effusion" if finding == "effusion" else "enlarged cardiac silhouette"
            items.append({"image": f"case_{index}.nii.gz", "phrase": phrase})
        write_json({"testing": items}, data / "datalist.json")
        cls.data = data

    @parameterized.expand([("counterfactual", "counterfactuals.json", ("counterfactual", "difference"), 2),
                           # grounding batches share one inversion, so items with other phrases go one at a time
                           ("phrase_grounding", "grounding.json", ("heatmap", "mask"), 1)])  # fmt: skip
    def test_two_processes_write_what_one_does(self, bundle, manifest, keys, batch_size):
        common = ["--datalist", str(self.data / "datalist.json"), "--dataset_dir", str(self.data)]
        common += ["--batch_size", str(batch_size)]
        one, two = self.tmp / f"{bundle}_one", self.tmp / f"{bundle}_two"
        check_ok(self, run_relocated(BUNDLES / bundle, ["inference.json"], *common, "--output_dir", str(one),
                                     cwd=self.tmp))  # fmt: skip
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
        result = run_relocated(BUNDLES / bundle, ["inference.json", "multi_gpu_inference.json"], *common,
                               "--output_dir", str(two), cwd=self.tmp, launcher=launcher)  # fmt: skip
        check_ok(self, result)
        self.assertEqual(sorted(p.name for p in two.iterdir()), sorted(p.name for p in one.iterdir()))
        records_one = json.loads((one / manifest).read_text())
        records_two = json.loads((two / manifest).read_text())
        self.assertEqual(records_two, records_one)  # the same records, in datalist order
        self.assertEqual([r["image"] for r in records_one], [str(self.data / f"case_{i}.nii.gz") for i in range(3)])
        for record in records_one:
            for key in keys:
                expected = nib.load(one / record[key])
                actual = nib.load(two / record[key])
                np.testing.assert_allclose(actual.affine, expected.affine)
                np.testing.assert_allclose(np.asarray(actual.dataobj), np.asarray(expected.dataobj), atol=1e-4)

    @parameterized.expand([("counterfactual", ["--num_items", "3"]),
                           ("phrase_grounding", ["--num_items", "3", "--batch_size", "1"])])  # fmt: skip
    def test_two_process_evaluation_gathers_the_same_metrics(self, bundle, overrides):
        phantoms = self.tmp / "phantoms"
        ensure_phantom_datalist(phantoms, kind="chest", num=40, seed=5000, size=64)
        common = ["--dataset_dir", str(phantoms), "--num_subjects", "40", "--seed", "5000"]
        common += ["--data_list_key", "training", *overrides]
        configs = ["inference.json", "evaluate.json"]
        one, two = self.tmp / f"{bundle}_evaluate_one", self.tmp / f"{bundle}_evaluate_two"
        check_ok(self, run_relocated(BUNDLES / bundle, configs, *common, "--output_dir", str(one), cwd=self.tmp))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
        result = run_relocated(BUNDLES / bundle, [*configs, "multi_gpu_inference.json"], *common,
                               "--output_dir", str(two), cwd=self.tmp, launcher=launcher)  # fmt: skip
        check_ok(self, result)
        self.assertEqual(sorted(p.name for p in two.iterdir()), ["metrics.json"])  # written once, by rank 0
        expected = json.loads((one / "metrics.json").read_text())
        actual = json.loads((two / "metrics.json").read_text())
        compare(self, actual, expected)  # settings, every metric and the per-image values in datalist order

    def test_traversal_two_processes_write_what_one_does(self):
        """Scans shared between two processes (2 and 1), each written into its own folder and merged by rank 0."""
        bundle = BUNDLES / "trajectory_traversal"
        common = ["--datalist", str(self.data / "datalist.json"), "--dataset_dir", str(self.data), "--batch_size", "1"]
        common += TRAVERSAL_FAST
        one, two = self.tmp / "traversal_one", self.tmp / "traversal_two"
        check_ok(self, run_relocated(bundle, ["inference.json"], *common, "--output_dir", str(one), cwd=self.tmp))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
        result = run_relocated(bundle, ["inference.json", "multi_gpu_inference.json"], *common,
                               "--output_dir", str(two), cwd=self.tmp, launcher=launcher)  # fmt: skip
        check_ok(self, result)
        self.assertEqual(sorted(p.name for p in two.iterdir()), sorted(p.name for p in one.iterdir()))
        self.assertEqual(sorted(p.name for p in self.tmp.iterdir() if p.name.startswith(".traversal")), [])
        expected = json.loads((one / "traversal.json").read_text())
        actual = json.loads((two / "traversal.json").read_text())
        self.assertEqual([t["name"] for t in expected["trajectories"]], ["case_0", "case_1", "case_2"])
        compare(self, actual, expected, "traversal")  # names, files, calls and probabilities in the run's order
        for record in expected["trajectories"]:
            for key in ("frames", "swaps"):
                expected_image = nib.load(one / record["files"][key])
                actual_image = nib.load(two / record["files"][key])
                np.testing.assert_allclose(actual_image.affine, expected_image.affine)
                np.testing.assert_allclose(actual_image.get_fdata(), expected_image.get_fdata(), atol=1e-4)

    def test_traversal_two_process_evaluation_gathers_the_same_metrics(self):
        bundle = BUNDLES / "trajectory_traversal"
        configs = ["inference.json", "evaluate.json"]
        common = [*TRAVERSAL_FAST, "--num_seeds", "4", "--num_scans", "2", "--num_reference_images", "4"]
        common += ["--bezier_window", "[3, 6]", "--swap_window", "[2, 5]", "--batch_size", "2"]
        one, two = self.tmp / "traversal_evaluate_one", self.tmp / "traversal_evaluate_two"
        check_ok(self, run_relocated(bundle, configs, *common, "--output_dir", str(one), cwd=self.tmp))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
        result = run_relocated(bundle, [*configs, "multi_gpu_inference.json"], *common,
                               "--output_dir", str(two), cwd=self.tmp, launcher=launcher)  # fmt: skip
        check_ok(self, result)
        self.assertEqual(sorted(p.name for p in two.iterdir()), ["metrics.json", "traversal_curves.png"])
        expected = json.loads((one / "metrics.json").read_text())
        actual = json.loads((two / "metrics.json").read_text())
        for pair in (*expected["pairs"].values(), *actual["pairs"].values()):
            pair.pop("seconds")  # wall time
        compare(self, actual, expected)


TRAVERSAL_FAST = ["--num_inference_steps", "10", "--swap_steps", "[2, 5, 8]", "--num_frames", "6"]


def compare(test, actual, expected, path="metrics"):
    """Nested metrics equal within float rounding (gathered items are averaged in another order)."""
    if isinstance(expected, dict):
        test.assertEqual(sorted(actual), sorted(expected), path)
        for key in expected:
            compare(test, actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        test.assertEqual(len(actual), len(expected), path)
        for index, (a, e) in enumerate(zip(actual, expected)):
            compare(test, a, e, f"{path}[{index}]")
    elif isinstance(expected, float):
        test.assertTrue(
            np.isclose(actual, expected, rtol=1e-4, atol=1e-6, equal_nan=True), f"{path}: {actual} {expected}"
        )
    else:
        test.assertEqual(actual, expected, path)
