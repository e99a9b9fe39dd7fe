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
"""The Mediffusion bundle through MONAI's CLI, run from another folder with --bundle_root, on tiny phantom sets and a
couple of iterations: train (2D and 3D, DiffMatch), evaluate the head, explain predictions, bad input, metadata."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from monai_cfx.data import ensure_phantom_datalist, generate_phantom, phantom_affine
from monai_cfx.utils import write_json, write_nifti
from tests.helpers import BUNDLES, check_ok, run_relocated, verify_metadata

BUNDLE = BUNDLES / "mediffusion"
# a couple of iterations of 4 items; a quarter of the tiny training split labelled (enough to cover every finding)
TINY_TRAIN = ["--max_epochs", "1", "--epoch_length", "2", "--batch_size", "4", "--labelled_fraction", "0.25"]
TINY_EXPLAIN = ["--num_items", "2", "--num_inference_steps", "10", "--batch_size", "2"]


def run(configs, *overrides, cwd) -> subprocess.CompletedProcess:
    return run_relocated(BUNDLE, configs, *overrides, cwd=cwd)


class MediffusionCase(unittest.TestCase):
    """Phantoms of seeds 5000 on (the latent diffusion UNet never saw them), written once into a temporary folder."""

    kind, size, spatial_dims, dims, num_subjects = "chest", 64, 2, "2d", 40
    configs_3d: list[str] = []

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())
        cls.data = cls.tmp / "data"
        ensure_phantom_datalist(cls.data, kind=cls.kind, num=cls.num_subjects, seed=5000, size=cls.size)
        cls.common = ["--dataset_dir", str(cls.data), "--num_subjects", str(cls.num_subjects), "--seed", "5000"]
        cls.models = cls.tmp / "models"

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def configs(self, *names):
        return [f"{name}.json" for name in names] + self.configs_3d

    def run_ok(self, configs, *overrides):
        result = run(configs, *self.common, *overrides, cwd=self.tmp)
        check_ok(self, result)
        return result.stdout + result.stderr

    def run_fails(self, configs, *overrides) -> str:
        result = run(configs, *self.common, *overrides, cwd=self.tmp)
        self.assertNotEqual(result.returncode, 0, msg=result.stdout[-2000:])
        return result.stdout + result.stderr

    def train(self, name, *overrides):
        out = self.tmp / f"train_{name}"
        log = self.run_ok(self.configs("train"), *TINY_TRAIN, "--output_dir", str(out), "--model_dir",
                          str(self.models), "--model_name", name, "--log_every", "1", *overrides)  # fmt: skip
        return out, log


class TestMediffusionBundle2D(MediffusionCase):
    def test_train_evaluate_explain(self):
        name = f"joint_{self.dims}_tiny"
        out, log = self.train(name)
        # the loss terms are logged every iteration, the validation AUROC every epoch
        for term in ("classification:", "diffusion:", "total:", "val_auroc"):
            self.assertIn(term, log)
        self.assertIn("'head.3.weight'", log)  # only the head is new: the UNet comes from diffusion_<dims>.pt
        self.assertIn("'head_norm.running_mean'", log)  # with its input normalisation (classifier_norm "batch")
        model = self.models / f"{name}.pt"
        self.assertTrue(model.is_file())
        self.assertTrue((out / "last_state.pt").is_file())
        record = json.loads((out / "training.json").read_text())
        self.assertEqual(record["num_labelled"] + record["num_unlabelled"], int(self.num_subjects * 0.8))
        self.assertEqual(record["num_labelled"], round(0.25 * int(self.num_subjects * 0.8)))
        self.assertEqual(record["labelled_per_batch"], 1)
        self.assertEqual(record["iterations"], 2)
        self.assertEqual(record["settings"]["diffusion_weight"], 1.0)
        state = torch.load(model, weights_only=True)
        self.assertEqual(tuple(state["head.3.weight"].shape)[0], len(record["settings"]["label_names"]))

        # a published model is never overwritten without --overwrite, nor a run folder: refused before training
        before = model.stat().st_mtime_ns
        message = self.run_fails(self.configs("train"), *TINY_TRAIN, "--output_dir", str(self.tmp / "again"),
                                 "--model_dir", str(self.models), "--model_name", name)  # fmt: skip
        self.assertIn("exists", message)
        self.assertEqual(model.stat().st_mtime_ns, before)
        self.assertFalse((self.tmp / "again").exists())

        # the head's AUROC on the testing split, every finding kept
        evaluation = self.tmp / f"evaluate_{self.dims}"
        self.run_ok(self.configs("inference", "evaluate_classifier"), "--model_dir", str(self.models),
                    "--model_name", name, "--output_dir", str(evaluation))  # fmt: skip
        metrics = json.loads((evaluation / "metrics.json").read_text())
        label_names = record["settings"]["label_names"]
        self.assertEqual(list(metrics["auroc"]), label_names)
        self.assertEqual(
            metrics["num_images"], self.num_subjects - int(self.num_subjects * 0.8) - self.num_subjects // 10
        )
        defined = [value for value in metrics["auroc"].values() if value is not None]
        self.assertEqual(metrics["num_findings_defined"], len(defined))
        if defined:
            self.assertAlmostEqual(metrics["auroc_macro"], float(np.mean(defined)), places=6)

        # guided counterfactuals measured against the healthy twins, with and without guidance
        measured = self.tmp / f"evaluate_counterfactual_{self.dims}"
        self.run_ok(self.configs("inference", "evaluate_counterfactual"), "--model_dir", str(self.models),
                    "--model_name", name, "--output_dir", str(measured), "--num_items", "2",
                    "--num_inference_steps", "10", "--guidance_scales", "[0, 10]")  # fmt: skip
        sweep = json.loads((measured / "metrics.json").read_text())["sweep"]
        self.assertEqual(list(sweep), ["0", "10"])
        for row in sweep.values():
            for key in ("validity", "head_validity", "adversarial", "localization_auroc", "twin_l1_outside"):
                self.assertIn(key, row)
            self.assertLessEqual(row["adversarial"], row["head_flips"])  # fooled only where the head flipped
            self.assertLessEqual(row["head_flips"], row["head_validity"])
        # without guidance the edit is the inversion's round trip: the finding stays, the anatomy too
        self.assertLess(sweep["0"]["twin_l1_outside"], 0.06)
        # the cost: 6 inversion and 6 denoising passes (strength 0.6 of 10 steps), plus one head pass per guided step
        self.assertEqual(sweep["0"]["unet_evaluations_per_image"], 12)
        self.assertEqual(sweep["10"]["unet_evaluations_per_image"], 18)
        self.assertGreater(sweep["10"]["seconds_per_image"], 0)

        # remove one finding and keep the others: the chest phantoms of the training split with two or more findings;
        # the brain phantoms have one finding only, which is refused with nothing written
        targeted = self.tmp / f"evaluate_targeted_{self.dims}"
        arguments = [self.configs("inference", "evaluate_targeted"), "--model_dir", str(self.models),
                     "--model_name", name, "--output_dir", str(targeted), "--data_list_key", "training",
                     "--num_inference_steps", "10"]  # fmt: skip
        if self.spatial_dims == 2:
            self.run_ok(*arguments)
            record = json.loads((targeted / "metrics.json").read_text())
            self.assertEqual(len(record["chosen"]), record["num_images"])
            self.assertGreater(record["num_images"], 0)
            self.assertLessEqual(record["removed_and_kept"], min(record["removed"], record["others_kept"]))
            self.assertEqual(record["settings"]["data_list_key"], "training")
        else:
            self.assertIn("two or more findings", self.run_fails(*arguments))
            self.assertFalse(targeted.exists())

        # explanations of 2 held-out phantoms: counterfactual and difference map on the input's grid
        explained = self.tmp / f"explain_{self.dims}"
        self.run_ok(self.configs("inference"), *TINY_EXPLAIN, "--model_dir", str(self.models), "--model_name", name,
                    "--output_dir", str(explained), "--decision_threshold", "0.3")  # fmt: skip
        manifest = json.loads((explained / "explanations.json").read_text())
        self.assertEqual(len(manifest["items"]), 2)
        self.assertEqual(manifest["settings"]["guidance_scale"], 3.0)
        for item in manifest["items"]:
            before_p, after_p = item["probabilities_before"], item["probabilities_after"]
            self.assertEqual(list(before_p), label_names)
            self.assertEqual(list(after_p), label_names)
            self.assertEqual(item["removed"], [k for k in label_names if before_p[k] > 0.3])
            self.assertIn("labels", item)
            for key in ("counterfactual", "difference"):
                image = nib.load(explained / item["files"][key])
                self.assertEqual(image.shape, (self.size,) * self.spatial_dims)
                np.testing.assert_allclose(image.affine, phantom_affine(self.kind, self.size))
            self.assertEqual("panel" in item["files"], self.spatial_dims == 2)
            if self.spatial_dims == 2:
                self.assertTrue((explained / item["files"]["panel"]).is_file())
        self.assertFalse(any(p.name.startswith(".") for p in explained.iterdir()))

        # a user's scan of another size, range and grid is brought to the model and explained back on its own grid
        scan_size = {2: 128, 3: 48}[self.spatial_dims]
        affine = np.diag([0.7] * self.spatial_dims + [1.0] * (4 - self.spatial_dims))
        scans = self.tmp / f"scans_{self.dims}"
        scans.mkdir()
        image = generate_phantom(self.kind, 9100, size=scan_size)["image"] * 4095.0  # a CT-like range
        write_nifti(image.astype(np.float32), affine, scans / "user_scan.nii.gz")
        write_json({"testing": [{"image": "user_scan.nii.gz"}]}, scans / "datalist.json")
        mine = self.tmp / f"explain_user_{self.dims}"
        self.run_ok(self.configs("inference"), *TINY_EXPLAIN, "--model_dir", str(self.models), "--model_name", name,
                    "--output_dir", str(mine), "--datalist", str(scans / "datalist.json"),
                    "--dataset_dir", str(scans))  # fmt: skip
        item = json.loads((mine / "explanations.json").read_text())["items"][0]
        for key in ("counterfactual", "difference"):
            written = nib.load(mine / item["files"][key])
            self.assertEqual(written.shape, (scan_size,) * self.spatial_dims)
            np.testing.assert_allclose(written.affine, affine, atol=1e-6)


class TestMediffusionBundle3D(TestMediffusionBundle2D):
    kind, size, spatial_dims, dims, num_subjects = "brain", 32, 3, "3d", 30
    configs_3d = ["3d.json"]

    def test_train_diffmatch(self):
        out, log = self.train(
            f"joint_{self.dims}_diffmatch", "--diffmatch", "True", "--classification_weight", "0.0005"
        )
        self.assertIn("diffmatch:", log)
        self.assertIn("confident_fraction:", log)
        record = json.loads((out / "training.json").read_text())
        self.assertTrue(record["settings"]["diffmatch"])


class TestMediffusionResume(MediffusionCase):
    def test_continued_run_equals_an_uninterrupted_one(self):
        """A run of 1 epoch continued to 2 (the whole training state restored: weights, EMA, optimizer, epoch, the
        sampler's order, the evaluator's best metric and kept checkpoint, every random state) publishes exactly the
        model of a run of 2 epochs; a resume with other settings is refused by name and changes nothing."""
        # full epochs (8 batches of 1 labelled and 3 unlabelled phantoms): exactness needs an epoch to be one pass
        tiny = ["--batch_size", "4", "--labelled_fraction", "0.25"]

        def train(name, epochs, *extra):
            out = self.tmp / f"train_{name}"
            log = self.run_ok(self.configs("train"), *tiny, "--max_epochs", str(epochs), "--output_dir", str(out),
                              "--model_dir", str(self.models), "--model_name", name, *extra)  # fmt: skip
            return out, log

        whole, _ = train("whole", 2)
        part, _ = train("part", 1)
        state = part / "training_state.pt"
        saved = state.stat().st_mtime_ns
        message = self.run_fails(self.configs("train"), *tiny, "--max_epochs", "2", "--output_dir", str(part),
                                 "--model_dir", str(self.models), "--model_name", "part", "--overwrite", "True",
                                 "--learning_rate", "0.001")  # fmt: skip
        self.assertIn("training_state.pt", message)
        self.assertIn("learning_rate", message)
        self.assertEqual(state.stat().st_mtime_ns, saved)
        _, log = train("part", 2, "--overwrite", "True")
        self.assertIn("resuming training from", log)
        for name, published in (("whole", whole), ("part", part)):
            record = json.loads((published / "training.json").read_text())
            self.assertEqual(record["iterations"], 16, name)
        records = [json.loads((out / "training.json").read_text()) for out in (whole, part)]
        self.assertEqual(records[0]["best_val_epoch"], records[1]["best_val_epoch"])
        self.assertEqual(records[0]["best_val_auroc"], records[1]["best_val_auroc"])
        load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
        for first, second in (
            (load(self.models / "whole.pt"), load(self.models / "part.pt")),
            (load(whole / "last_state.pt")["network"], load(part / "last_state.pt")["network"]),
            (load(whole / "last_state.pt")["ema_network"], load(part / "last_state.pt")["ema_network"]),
        ):
            self.assertEqual(set(first), set(second))
            for key in first:
                torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)


class TestOracleBaseline(MediffusionCase):
    def test_train_and_evaluate_the_image_baseline(self):
        out = self.tmp / "baseline"
        self.run_ok(["train.json", "train_oracle_baseline.json"], "--labelled_fraction", "0.25", "--baseline_epochs",
                    "2", "--output_dir", str(out), "--model_dir", str(self.models))  # fmt: skip
        record = json.loads((out / "training.json").read_text())
        self.assertEqual(record["num_labelled"], round(0.25 * int(self.num_subjects * 0.8)))
        self.assertEqual(record["iterations"], 2)  # 8 labelled phantoms at the oracle's batch of 32: one per epoch
        self.assertFalse((BUNDLES / "latent_diffusion" / "models" / "last.pt").exists())
        evaluation = self.tmp / "baseline_eval"
        overrides = ["--classifier_kind", "image", "--model_dir", str(self.models), "--model_name"]
        self.run_ok(["inference.json", "evaluate_classifier.json"], *overrides, "oracle_baseline_2d_0.25",
                    "--output_dir", str(evaluation))  # fmt: skip
        metrics = json.loads((evaluation / "metrics.json").read_text())
        self.assertEqual(metrics["settings"]["classifier_kind"], "image")
        self.assertEqual(list(metrics["auroc"]), ["opacity", "effusion", "cardiomegaly", "nodule"])


class TestMediffusionBadInput(MediffusionCase):
    def test_bad_input_writes_nothing(self):
        for fraction in ("0", "1.5"):
            with self.subTest(labelled_fraction=fraction):
                out = self.tmp / f"bad_{fraction}"
                message = self.run_fails(self.configs("train"), "--labelled_fraction", fraction, "--output_dir",
                                         str(out), "--model_dir", str(self.tmp / "bad_models"))  # fmt: skip
                self.assertIn("`labelled_fraction` must be in (0, 1]", message)
                self.assertFalse(out.exists())
                self.assertFalse((self.tmp / "bad_models").exists())

    def test_scans_that_cannot_be_used_are_refused(self):
        scans = self.tmp / "bad_scans"
        scans.mkdir()
        write_nifti(np.full((1, 64, 64), 0.5, np.float32), np.eye(4), scans / "constant.nii.gz")
        write_json({"testing": [{"image": "constant.nii.gz"}]}, scans / "constant.json")
        write_json({"testing": [{"image": ""}]}, scans / "empty.json")
        for datalist, expected in (("constant.json", "constant.nii.gz"), ("empty.json", "non-empty file path")):
            with self.subTest(datalist=datalist):
                out = self.tmp / f"refused_{datalist}"
                message = self.run_fails(["inference.json"], "--datalist", str(scans / datalist), "--dataset_dir",
                                         str(scans), "--output_dir", str(out))  # fmt: skip
                self.assertIn(expected, message)
                self.assertFalse(out.exists())

    def test_head_that_does_not_fit_is_refused(self):
        # a joint checkpoint of this UNet whose head has 3 outputs, not the chest phantoms' 4 findings
        from monai_cfx.apps.bundle_config import load_bundle_config
        from monai_cfx.apps.mediffusion import joint_network

        parser = load_bundle_config(BUNDLES / "latent_diffusion", ["configs/inference.json"], device="cpu")
        network = joint_network(parser.get_parsed_content("diffusion_def", instantiate=False), 3, classifier_hidden=8)
        self.models.mkdir(parents=True, exist_ok=True)
        torch.save(network.state_dict(), self.models / "three.pt")
        out = self.tmp / "evaluate_three"
        overrides = ["--model_dir", str(self.models), "--model_name", "three", "--classifier_hidden", "8"]
        message = self.run_fails(["inference.json", "evaluate_classifier.json"], *overrides, "--output_dir", str(out))
        self.assertIn("does not fit", message)
        self.assertIn("num_classes=4", message)
        self.assertFalse(out.exists())

    def test_metadata_verifies(self):
        result = verify_metadata(str(BUNDLE / "configs" / "metadata.json"), bundle=BUNDLE)
        check_ok(self, result)
        self.assertIn("metadata is verified with no error", result.stdout + result.stderr)


if __name__ == "__main__":
    unittest.main()
