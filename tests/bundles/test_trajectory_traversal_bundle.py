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
"""The trajectory traversal bundle through MONAI's CLI, run from another folder with --bundle_root: seeds and scans,
2D and 3D, evaluation, bad input; and the shipped weights traversing unseen seeds."""

from __future__ import annotations

import json
import os
import subprocess
import unittest

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from monai_cfx.data import generate_phantom, phantom_affine
from monai_cfx.utils import write_json, write_nifti
from tests.helpers import BUNDLES, TempFolderCase, check_ok, run_relocated, verify_metadata

BUNDLE = BUNDLES / "trajectory_traversal"
FAST = ["--num_inference_steps", "10", "--swap_steps", "[2, 5, 8]", "--num_frames", "6"]


def run(configs, *overrides, cwd) -> subprocess.CompletedProcess:
    return run_relocated(BUNDLE, configs, *overrides, cwd=cwd)


class TraversalCase(TempFolderCase):
    def run_ok(self, configs, *overrides):
        result = run(configs, *overrides, cwd=self.tmp)
        check_ok(self, result)
        return result

    def run_fails(self, configs, *overrides) -> str:
        result = run(configs, *overrides, cwd=self.tmp)
        self.assertNotEqual(result.returncode, 0, msg=result.stdout[-2000:])
        return result.stdout + result.stderr


class TestTraversalBundle2D(TraversalCase):
    configs: list[str] = ["inference.json"]
    kind, size, spatial_dims = "chest", 64, 2

    def test_seeds_outputs_and_no_overwrite(self):
        out = self.tmp / f"seeds_{self.spatial_dims}d"
        self.run_ok(self.configs, *FAST, "--seeds", "[3, 4]", "--output_dir", str(out))
        manifest = json.loads((out / "traversal.json").read_text())
        self.assertEqual(manifest["swap_steps"], [8, 5, 2])
        self.assertEqual(manifest["num_model_calls"], 25)  # 10 shared + 2 + 5 + 8, for the batch of both seeds
        self.assertEqual([t["name"] for t in manifest["trajectories"]], ["seed_3", "seed_4"])
        record = manifest["trajectories"][0]
        self.assertEqual(len(next(iter(record["frame_probabilities"].values()))), 6)
        self.assertEqual(sorted(next(iter(record["swap_probabilities"].values()))), ["2", "5", "8"])
        files = record["files"]
        frame_files = files["frames"] if isinstance(files["frames"], list) else [files["frames"]]
        image = nib.load(out / frame_files[0])
        np.testing.assert_allclose(image.affine, phantom_affine(self.kind, self.size))
        expected = (self.size,) * 2 + (1, 1, 6) if self.spatial_dims == 2 else (self.size,) * 3
        self.assertEqual(image.shape, expected)
        self.assertEqual(len(frame_files), 1 if self.spatial_dims == 2 else 6)
        with Image.open(out / files["gif"]) as gif:
            self.assertEqual(gif.n_frames, 6)
        latents = torch.load(out / files["latents"], weights_only=True)
        self.assertEqual(tuple(latents["frame_latents"].shape)[0], 6)
        self.assertTrue(torch.equal(latents["frame_latents"][0], latents["neutral_latent"]))
        self.assertFalse(any(name.startswith(".") for name in os.listdir(out)))  # no temporary left behind
        # an existing output folder is refused, before any model is loaded, and left as it was
        before = sorted(os.listdir(out))
        message = self.run_fails(self.configs, *FAST, "--seeds", "[3]", "--output_dir", str(out))
        self.assertIn("exists", message)
        self.assertEqual(sorted(os.listdir(out)), before)

    def test_evaluate(self):
        out = self.tmp / f"evaluate_{self.spatial_dims}d"
        configs = ["inference.json", "evaluate.json", *self.configs[1:]]
        tiny = ["--num_seeds", "2", "--num_scans", "1", "--num_reference_images", "4", "--bezier_window", "[3, 6]"]
        self.run_ok(configs, *FAST, *tiny, "--swap_window", "[2, 5]", "--output_dir", str(out))
        metrics = json.loads((out / "metrics.json").read_text())
        self.assertEqual(metrics["num_seeds"], 2)
        self.assertTrue((out / "traversal_curves.png").is_file())
        for pair in metrics["pairs"].values():
            self.assertEqual(len(pair["cosine"]), 3)
            self.assertAlmostEqual(pair["cosine"][0], 1.0, places=5)  # the reference swap against itself
            for key in ("cfrt_bezier", "cfrt_swaps", "neutral_free", "earliest_has", "bezier_monotone"):
                self.assertTrue(0.0 <= pair[key] <= 1.0, key)
            self.assertEqual(len(pair["bezier_target_probability"]), 6)
            self.assertAlmostEqual(pair["identity_ssim"][0], 1.0, places=4)  # frame 0 is the neutral image
            self.assertIn("latest_swap_ssim_to_input", pair["scan"])


class TestTraversalBundle3D(TestTraversalBundle2D):
    configs = ["inference.json", "3d.json"]
    kind, size, spatial_dims = "brain", 32, 3


class TestScansAndBadInput(TraversalCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        data = cls.tmp / "scans"
        data.mkdir()
        affine = np.diag([0.8, 0.8, 1.0, 1.0])  # the user's own grid, not the phantoms'
        for seed, size in ((0, 64), (1, 128)):  # the model's size, and the phantom generator's default
            write_nifti(generate_phantom("chest", 7000 + seed, size=size, findings=[])["image"], affine,
                        data / f"patient_{seed}.nii.gz")  # fmt: skip
        write_nifti(np.zeros((1, 48, 48), dtype=np.float32), affine, data / "small.nii.gz")
        write_json({"testing": [{"image": "patient_0.nii.gz"}, {"image": "patient_1.nii.gz"}]}, data / "scans.json")
        write_json({"testing": [{"image": "patient_0.nii.gz"}, {"image": "small.nii.gz"}]}, data / "bad.json")
        write_json({"testing": [{"image": ""}]}, data / "empty_image.json")
        cls.data, cls.affine = data, affine

    def scans(self, datalist):
        return ["--datalist", str(self.data / datalist), "--dataset_dir", str(self.data)]

    def test_scans_keep_their_grid(self):
        out = self.tmp / "scans_out"
        self.run_ok(["inference.json"], *FAST, *self.scans("scans.json"), "--output_dir", str(out),
                    "--inversion_fixed_point_iterations", "1")  # fmt: skip
        manifest = json.loads((out / "traversal.json").read_text())
        self.assertEqual([t["name"] for t in manifest["trajectories"]], ["patient_0", "patient_1"])
        image = nib.load(out / manifest["trajectories"][1]["files"]["frames"])
        np.testing.assert_allclose(image.affine, self.affine)
        self.assertEqual(image.shape[:2], (128, 128))  # traversed at 64x64, written back on the scan's own grid

    def test_bad_input_writes_nothing(self):
        cases = [
            (self.scans("bad.json"), "small.nii.gz"),  # a scan that does not fit names its file
            (self.scans("empty_image.json"), "'image' must be a non-empty file path"),
            (["--datalist", str(self.data / "missing.json")], "missing.json"),
            (["--seeds", "[]"], "seeds"),
            (["--swap_steps", "[5, 5]"], "swap_steps"),  # the inferer's other refusals: tests/inferers/test_traversal
        ]
        for index, (overrides, expected) in enumerate(cases):
            out = self.tmp / f"bad_{index}"
            with self.subTest(overrides=overrides):
                message = self.run_fails(["inference.json"], "--num_inference_steps", "50", *overrides,
                                         "--output_dir", str(out))  # fmt: skip
                self.assertIn(expected, message)
                self.assertFalse(out.exists())
                self.assertEqual([p for p in self.tmp.iterdir() if p.name.startswith(f".bad_{index}")], [])


class TestShippedWeightsTraverse(TraversalCase):
    """The shipped 2D model on 8 seeds it never saw, at the bundle's defaults (30 steps, guidance 7.5): the
    neutral images carry no effusion and the earliest swaps do, the trajectory bends (cosine falls with λ) and the
    effusion's probability rises more than every other finding's along the Bézier frames. Measured: neutral 8/8
    free, λ = 3 8/8 with effusion, CFRT 1.0, cosine 1.0 -> 0.31 (50 steps: the same, cosine 1.0 -> 0.33)."""

    def test_effusion_trajectory(self):
        out = self.tmp / "shipped"
        overrides = ["--num_seeds", "8", "--seed", "4000", "--num_scans", "0", "--num_reference_images", "8"]
        pair = '[{"finding": "effusion", "neutral_prompt": "Normal chest radiograph.", "target_prompt": ' \
               '"Chest radiograph with a moderate right pleural effusion."}]'  # fmt: skip
        self.run_ok(["inference.json", "evaluate.json"], *overrides, "--pairs", pair, "--output_dir", str(out))
        metrics = json.loads((out / "metrics.json").read_text())["pairs"]["effusion"]
        self.assertGreaterEqual(metrics["neutral_free"], 0.75)
        self.assertGreaterEqual(metrics["earliest_has"], 0.75)
        self.assertGreaterEqual(metrics["cfrt_bezier"], 0.75)
        self.assertLess(metrics["cosine"][-1], 0.7)
        self.assertGreater(metrics["cosine"][1], metrics["cosine"][-1])


class TestTraversalMetadata(unittest.TestCase):
    def test_verifies_offline(self):
        result = verify_metadata(str(BUNDLE / "configs" / "metadata.json"), bundle=BUNDLE)
        check_ok(self, result)
        self.assertIn("metadata is verified with no error", result.stdout + result.stderr)


if __name__ == "__main__":
    unittest.main()
