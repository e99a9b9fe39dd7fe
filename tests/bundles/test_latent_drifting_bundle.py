"""The Latent Drifting bundle's configs, run through MONAI's CLI on the latent diffusion bundle's shipped weights."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import torch

from monai_cfx.data import phantom_affine
from tests.helpers import BUNDLES, ShippedWeightsCase, check_ok, verify_metadata

BUNDLE = BUNDLES / "latent_drifting"
FAST = ["--num_inference_steps", "3"]
TINY_TRAINING = ["--max_epochs", "1", "--batch_size", "2"]


class DriftingCase(ShippedWeightsCase):
    bundle = BUNDLE
    image_size = 64

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # a tiny target set: 4 training images and two held-out splits of 4
        cls.common = [
            "--dataset_dir", str(cls.tmp / "target"),
            "--num_target_training", "4",
            "--num_target_held_out", "4",
        ]  # fmt: skip

    def finetune(self, mode, *overrides):
        path = self.tmp / f"{mode}.pt"
        result = self.run_configs(
            self.configs("finetune"), *self.common, *TINY_TRAINING, "--mode", mode, "--finetuned_path", str(path),
            *overrides,
        )  # fmt: skip
        check_ok(self, result)
        return path


class TestLatentDriftingBundle2D(DriftingCase):
    def test_modes_inference_evaluate_and_no_overwrite(self):
        # Textual Inversion keeps only the new token's embedding
        path = self.finetune("textual_inversion", "--drift", "0.02")
        state = torch.load(path, weights_only=True)
        self.assertEqual((state["mode"], state["token"], state["drift"], state["unet"]), ("textual_inversion",
                         "<target-domain>", 0.02, {}))  # fmt: skip
        self.assertEqual(state["token_embeddings"]["tokens"], ["<target-domain>"])

        out = self.tmp / "inference"
        args = [*self.common, *FAST, "--finetuned_path", str(path), "--output_dir", str(out)]
        check_ok(self, self.run_configs(self.configs("inference"), *args))
        records = json.loads((out / "prompts.json").read_text())
        self.assertTrue(records and all(r["prompt"].startswith("<target-domain> ") for r in records))
        image = nib.load(out / records[0]["image"])
        np.testing.assert_allclose(image.affine, phantom_affine(self.kind, self.image_size))
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        again = self.run_configs(self.configs("inference"), *args)
        self.assertNotEqual(again.returncode, 0)
        self.assertIn("exists", again.stderr + again.stdout)
        self.assertEqual({p.name: p.read_bytes() for p in out.iterdir()}, before)

        # DreamBooth generates its class prior first, then trains on instance + prior batches
        path = self.finetune("dreambooth", *FAST, "--num_prior_samples", "4")
        self.assertEqual(torch.load(path, weights_only=True)["token"], "sks")
        out = self.tmp / "evaluate"
        check_ok(
            self,
            self.run_configs(
                self.configs("evaluate"), *self.common, *FAST, "--finetuned_path", str(path), "--output_dir", str(out)
            ),
        )
        metrics = json.loads((out / "metrics.json").read_text())
        self.assertEqual((metrics["mode"], metrics["drift"]), ("dreambooth", 0.0))
        for key in ("l1", "fid", "kid", "kid_std"):
            self.assertTrue(np.isfinite(metrics["generated"][key]) and np.isfinite(metrics["real_vs_real"][key]))
        self.assertEqual(metrics["generated"]["num_generated"], 4)
        self.assertGreater((out / "samples.png").stat().st_size, 1000)

    def test_drift_search(self):
        out = self.tmp / "search"
        overrides = ["--drift_low", "-0.1", "--drift_high", "0.1", "--drift_num", "3", "--num_samples", "4"]
        check_ok(
            self,
            self.run_configs(self.configs("drift_search"), *self.common, *FAST, *overrides, "--output_dir", str(out)),
        )
        result = json.loads((out / "drift_search.json").read_text())
        self.assertEqual([row["drift"] for row in result["rows"]], [-0.1, 0.0, 0.1])
        self.assertEqual(result["best_drift"], min(result["rows"], key=lambda row: row["l1"])["drift"])
        with open(out / "drift_search.csv") as f:
            self.assertEqual(len(list(csv.DictReader(f))), 3)
        self.assertGreater((out / "drift_search.png").stat().st_size, 1000)

    def test_bad_input_writes_nothing(self):
        cases = [
            (["--mode", "lora"], "`mode` must be one of"),
            (["--mode", "dreambooth", "--token", "$None"], "needs `token`"),
            (["--drift", "[0.1, 0.2]"], "one value per latent channel"),
        ]
        for overrides, message in cases:
            path = self.tmp / "bad.pt"
            finetune = [*self.common, *TINY_TRAINING, "--finetuned_path", str(path), *overrides]
            result = self.run_configs(self.configs("finetune"), *finetune)
            self.assertNotEqual(result.returncode, 0, overrides)
            self.assertIn(message, result.stderr + result.stdout)
            self.assertFalse(path.exists())
        missing = self.run_configs(
            self.configs("inference"), *self.common, "--finetuned_path", str(self.tmp / "none.pt")
        )
        self.assertIn("run the bundle's finetune.json first", missing.stderr + missing.stdout)

    def test_metadata(self):
        check_ok(self, verify_metadata("configs/metadata.json", bundle=BUNDLE))


class TestLatentDriftingBundle3D(DriftingCase):
    configs_3d = ["configs/3d.json"]
    kind, image_size = "brain", 32

    def test_custom_diffusion_on_ageing_brains(self):
        path = self.finetune("custom_diffusion", "--drift", "[0.01, 0.0, -0.01]")
        state = torch.load(path, weights_only=True)
        self.assertEqual(state["drift"], [0.01, 0.0, -0.01])
        self.assertTrue(state["unet"] and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in state["unet"]))
        datalist = json.loads((self.tmp / "target" / "datalist.json").read_text())
        ages = [item["attributes"]["age"] for split in ("training", "testing") for item in datalist[split]]
        self.assertTrue(all(70 <= age <= 90 for age in ages))
        out = self.tmp / "inference"
        args = [*self.common, *FAST, "--finetuned_path", str(path), "--output_dir", str(out)]
        check_ok(self, self.run_configs(self.configs("inference"), *args))
        records = json.loads((out / "prompts.json").read_text())
        image = nib.load(out / records[0]["image"])
        self.assertEqual(image.shape[:3], (32, 32, 32))
        np.testing.assert_allclose(image.affine, phantom_affine("brain", 32))
