"""The counterfactual bundle's configs, run through MONAI's CLI with the shipped latent diffusion weights."""

from __future__ import annotations

import json
import unittest

import nibabel as nib
import numpy as np
import torch

from tests.helpers import BUNDLES, ShippedWeightsCase, check_ok, verify_metadata

BUNDLE = BUNDLES / "counterfactual"
FAST = ["--num_inference_steps", "10", "--batch_size", "4"]


class CounterfactualCase(ShippedWeightsCase):
    bundle = BUNDLE


class TestCounterfactualBundle2D(CounterfactualCase):
    def test_inference_outputs_and_no_overwrite(self):
        out = self.tmp / "inference"
        check_ok(
            self,
            self.run_configs(
                self.configs("inference"), *self.common, *FAST, "--num_items", "3", "--output_dir", str(out)
            ),
        )
        records = json.loads((out / "counterfactuals.json").read_text())
        self.assertEqual(len(records), 3)
        source = nib.load(records[0]["image"])
        for key in ("counterfactual", "difference"):
            saved = nib.load(out / records[0][key])
            np.testing.assert_allclose(saved.affine, source.affine)
            self.assertEqual(saved.shape, source.shape)
            self.assertTrue(np.isfinite(np.asarray(saved.dataobj)).all())
        if self.kind == "chest":
            self.assertTrue((out / records[0]["panel"]).is_file())
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        again = self.run_configs(
            self.configs("inference"), *self.common, *FAST, "--num_items", "3", "--output_dir", str(out)
        )
        self.assertNotEqual(again.returncode, 0)
        self.assertIn("exists", again.stdout + again.stderr)
        self.assertEqual(before, {p.name: p.stat().st_mtime_ns for p in out.iterdir()})

    def test_evaluate_and_induce(self):
        for name, extra in (("evaluate", []), ("induce", ["configs/induce.json"])):
            out = self.tmp / name
            configs = ["configs/inference.json", "configs/evaluate.json", *extra, *self.configs_3d]
            overrides = ["--num_items", "3", "--data_list_key", "training", "--output_dir", str(out)]
            check_ok(self, self.run_configs(configs, *self.common, *FAST, *overrides))
            metrics = json.loads((out / "metrics.json").read_text())
            self.assertEqual(metrics["settings"]["direction"], "remove" if name == "evaluate" else "induce")
            self.assertEqual(metrics["settings"]["num_items"], 3)
            for key in ("validity", "localization_auroc", "ssim", "ms_ssim", "twin_l1", "l1_outside"):
                self.assertTrue(0.0 <= metrics[key] <= 1.0, (key, metrics[key]))
            for key in ("fid", "kid", "input_fid"):
                self.assertTrue(np.isfinite(metrics[key]), key)
            self.assertEqual(len(metrics["per_image"]["validity"]), 3)


class TestCounterfactualBundle3D(TestCounterfactualBundle2D):
    configs_3d = ["configs/3d.json"]
    image_size, kind = 32, "brain"


class TestTrainedCounterfactual(CounterfactualCase):
    def test_removes_the_finding_and_keeps_the_rest(self):
        """The shipped 2D model, at the bundle's settings, on abnormal phantoms it was not trained on."""
        out = self.tmp / "trained"
        overrides = ["--num_items", "12", "--data_list_key", "training", "--output_dir", str(out)]
        check_ok(self, self.run_configs(self.configs("evaluate"), *self.common, *overrides))
        metrics = json.loads((out / "metrics.json").read_text())
        self.assertGreaterEqual(metrics["validity"], 0.8)
        self.assertGreaterEqual(metrics["localization_auroc"], 0.9)
        # the edit is concentrated on the finding, and inside it the result moves to the true healthy twin
        self.assertGreater(metrics["l1_inside"], 3 * metrics["l1_outside"])
        self.assertLess(metrics["twin_l1_inside"], 0.5 * metrics["l1_inside"])


class TestUserDatalistAndBadInput(CounterfactualCase):
    def test_own_datalist_with_prompts_and_no_masks(self):
        phantoms, datalist, overrides = self.own_datalist(*FAST)
        own = {"testing": [
            {"image": phantoms[0]["image"], "prompt": "Chest radiograph with cardiomegaly."},
            {"image": phantoms[1]["image"]},
        ]}  # fmt: skip
        datalist.write_text(json.dumps(own))
        out = self.tmp / "own"
        check_ok(self, self.run_configs(self.configs("inference"), *FAST, *overrides))
        records = json.loads((out / "counterfactuals.json").read_text())
        self.assertEqual(
            [r["prompt"] for r in records], ["Chest radiograph with cardiomegaly.", "Normal chest radiograph."]
        )

        bad = self.run_configs(
            self.configs("inference"),
            *FAST,
            *overrides[:4],
            "--output_dir",
            str(self.tmp / "bad"),
            "--noise_strength",
            "1.5",
        )
        self.assertNotEqual(bad.returncode, 0)
        self.assertIn("`noise_strength` must be a number in (0, 1]", bad.stdout + bad.stderr)
        self.assertFalse((self.tmp / "bad").exists())

        volume = self.tmp / "volume.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), volume)
        datalist.write_text(json.dumps({"testing": [{"image": str(volume)}]}))
        wrong = self.run_configs(
            self.configs("inference"), *FAST, *overrides[:4], "--output_dir", str(self.tmp / "wrong")
        )
        self.assertNotEqual(wrong.returncode, 0)
        self.assertIn(
            "volume.nii.gz' has shape (1, 16, 16, 16) (channel first): expected 2 spatial dimensions",
            wrong.stdout + wrong.stderr,
        )
        self.assertFalse(list((self.tmp / "wrong").glob("*.nii.gz")) if (self.tmp / "wrong").exists() else [])


class TestUnetAcceleration(unittest.TestCase):
    def test_config_switches_keep_the_counterfactual(self):
        """The config's speed switches on the shipped weights: channels_last and flash attention change nothing
        beyond float rounding, bf16 autocast only rounding (the plain path is the default)."""
        from monai_cfx.apps.bundle_config import load_bundle_config
        from monai_cfx.data import chest_phantom

        image = torch.from_numpy(chest_phantom(5001, 64, findings=["effusion"])["image"])[None]
        results = {}
        for name, switches in (
            ("plain", {}),
            ("fast", {"channels_last": True, "flash_attention": True}),
            ("bf16", {"autocast_dtype": "bfloat16"}),
        ):
            parser = load_bundle_config(BUNDLE, ["configs/inference.json"], device="cpu", num_inference_steps=4)
            for key, value in switches.items():
                parser[f"unet_acceleration#{key}"] = value
            get = parser.get_parsed_content
            with torch.no_grad():
                context = get("text_encoder")([get("healthy_prompt")])
                uncond = get("text_encoder").null_context(1)
            inferer = get("counterfactual_inferer")
            unet = get("load_diffusion")
            self.assertEqual(unet.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last), name == "fast")
            results[name] = inferer(image, unet, get("load_autoencoder"), context, uncond, seed=0)
        torch.testing.assert_close(results["fast"], results["plain"], atol=1e-4, rtol=0)
        difference = float((results["bf16"] - results["plain"]).abs().mean())
        self.assertTrue(0 < difference < 0.02, difference)


class TestCounterfactualMetadata(unittest.TestCase):
    def test_verifies_offline(self):
        result = verify_metadata("configs/metadata.json", bundle=BUNDLE)
        check_ok(self, result)
        self.assertIn("metadata is verified with no error", result.stdout + result.stderr)


if __name__ == "__main__":
    unittest.main()
