"""The phrase grounding bundle's configs, run through MONAI's CLI: the shipped latent diffusion weights on phantoms,
a user's datalist, bad input, and a tiny replica of the model-zoo CXR latent diffusion bundle."""

from __future__ import annotations

import json
import unittest

import nibabel as nib
import numpy as np
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from tests.helpers import (
    BUNDLES,
    ShippedWeightsCase,
    check_ok,
    legacy_keys,
    save_tiny_sd_text_encoder,
    verify_metadata,
)

BUNDLE = BUNDLES / "phrase_grounding"
FAST = ["--num_inference_steps", "10"]
# the shipped 2D model on these 24 unseen phantoms: macro AUROC 0.928, CNR 1.67, every class's AUROC >= 0.81 (the
# UNet without 16x16 cross-attention: 0.86 and 1.29 on the test split); the bounds leave room for other arithmetic
MIN_MACRO_AUROC, MIN_MACRO_CNR, MIN_CLASS_AUROC = 0.88, 1.4, 0.75


class GroundingCase(ShippedWeightsCase):
    bundle = BUNDLE
    num_subjects = 100  # enough held-out items with phrases


class TestPhraseGroundingBundle2D(GroundingCase):
    def test_inference_evaluate_and_no_overwrite(self):
        out = self.tmp / "inference"
        check_ok(
            self,
            self.run_configs(
                self.configs("inference"), *self.common, *FAST, "--num_items", "3", "--output_dir", str(out)
            ),
        )
        records = json.loads((out / "grounding.json").read_text())
        testing = json.loads((self.tmp / "data" / "datalist.json").read_text())["testing"]
        self.assertEqual(len(records), min(3, sum(bool(item["phrases"]) for item in testing)))
        for record in records:
            self.assertTrue(record["phrases"] and all(p.lower() in record["prompt"].lower() for p in record["phrases"]))
            source = nib.load(record["image"])
            heatmap, mask = nib.load(out / record["heatmap"]), nib.load(out / record["mask"])
            np.testing.assert_allclose(heatmap.affine, source.affine)
            np.testing.assert_allclose(mask.affine, source.affine)
            values = np.asarray(heatmap.dataobj)
            spatial = source.shape[: 3 if self.kind == "brain" else 2]
            self.assertEqual(values.shape[: len(spatial)], spatial)
            self.assertEqual(int(np.prod(values.shape[len(spatial) :])), len(record["phrases"]))  # one per phrase
            self.assertTrue(0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0.5)
            self.assertEqual(set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0.0, 1.0}, True)
            self.assertEqual("overlay" in record, self.kind == "chest")
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        again = self.run_configs(
            self.configs("inference"), *self.common, *FAST, "--num_items", "3", "--output_dir", str(out)
        )
        self.assertNotEqual(again.returncode, 0)
        self.assertIn("exists", again.stdout + again.stderr)
        self.assertEqual(before, {p.name: p.stat().st_mtime_ns for p in out.iterdir()})

        evaluation = self.tmp / "evaluate"
        check_ok(
            self,
            self.run_configs(
                self.configs("evaluate"), *self.common, *FAST, "--num_items", "4", "--output_dir", str(evaluation)
            ),
        )
        metrics = json.loads((evaluation / "metrics.json").read_text())
        num_items = min(4, sum(bool(item["phrases"]) for item in testing))
        self.assertEqual(metrics["settings"]["num_items"], num_items)
        grounding = metrics["grounding"]
        self.assertGreaterEqual(grounding["all"]["count"], num_items)
        for name in ("macro", "all"):
            self.assertTrue(0.0 <= grounding[name]["auroc"] <= 1.0)
            self.assertTrue(0.0 <= grounding[name]["miou"] <= 1.0)
            self.assertGreaterEqual(grounding[name]["cnr"], 0.0)


class TestPhraseAlonePrompts(GroundingCase):
    def test_one_finding_items_prompted_with_their_phrase(self):
        """MS-CXR's protocol: --prompt_from_report False prompts each item with its phrases instead of its report,
        and evaluate.json's --phrases_per_item 1 keeps only the one-finding items."""
        out = self.tmp / "alone"
        overrides = ["--prompt_from_report", "False", "--phrases_per_item", "1", "--num_items", "3"]
        check_ok(
            self, self.run_configs(self.configs("evaluate"), *self.common, *FAST, *overrides, "--output_dir", str(out))
        )
        testing = json.loads((self.tmp / "data" / "datalist.json").read_text())["testing"]
        one_finding = [item for item in testing if len(item["phrases"]) == 1]
        settings = json.loads((out / "metrics.json").read_text())["settings"]
        self.assertEqual(settings["num_items"], min(3, len(one_finding)))
        self.assertEqual((settings["prompt_from_report"], settings["phrases_per_item"]), (False, 1))
        out = self.tmp / "alone_inference"
        check_ok(
            self,
            self.run_configs(
                self.configs("inference"), *self.common, *FAST, "--prompt_from_report", "False", "--num_items", "2",
                "--output_dir", str(out),
            ),
        )  # fmt: skip
        for record in json.loads((out / "grounding.json").read_text()):
            self.assertEqual(record["prompt"], ". ".join(record["phrases"]) + ".")


class TestPhraseGroundingBundle3D(TestPhraseGroundingBundle2D):
    configs_3d = ["configs/3d.json"]
    kind = "brain"


class TestTrainedGrounding(GroundingCase):
    def test_finds_each_phrase_in_unseen_phantoms(self):
        """The shipped 2D model at the bundle's settings, on phantoms it was not trained on: every finding class's
        heat maps rank the pixels of the phrase's box above the rest."""
        out = self.tmp / "trained"
        overrides = ["--num_items", "24", "--data_list_key", "training", "--output_dir", str(out)]
        check_ok(self, self.run_configs(self.configs("evaluate"), *self.common, *overrides))
        grounding = json.loads((out / "metrics.json").read_text())["grounding"]
        self.assertGreaterEqual(grounding["macro"]["count"], 4)  # all four finding classes were scored
        self.assertGreaterEqual(grounding["macro"]["auroc"], MIN_MACRO_AUROC)
        self.assertGreaterEqual(grounding["macro"]["cnr"], MIN_MACRO_CNR)
        for name in ("opacity", "effusion", "cardiomegaly", "nodule"):
            self.assertGreaterEqual(grounding[name]["auroc"], MIN_CLASS_AUROC, name)


class TestUserDatalistAndBadInput(GroundingCase):
    def test_phrases_without_boxes_and_a_phrase_missing_from_the_prompt(self):
        phantoms, datalist, overrides = self.own_datalist(*FAST)
        own = {"testing": [
            {"image": phantoms[0]["image"], "prompt": "Chest radiograph with cardiomegaly.", "phrase": "cardiomegaly"},
            {"image": phantoms[1]["image"], "phrases": ["small left pleural effusion", "cardiomegaly"]},
        ]}  # fmt: skip
        datalist.write_text(json.dumps(own))
        out = self.tmp / "own"
        check_ok(self, self.run_configs(self.configs("inference"), *FAST, *overrides))
        records = json.loads((out / "grounding.json").read_text())
        self.assertEqual(records[0]["phrases"], ["cardiomegaly"])
        # without a prompt the phrases themselves are the prompt
        self.assertEqual(records[1]["prompt"], "small left pleural effusion. cardiomegaly.")
        self.assertEqual(nib.load(out / records[1]["heatmap"]).shape[-1], 2)

        own["testing"][0]["phrase"] = "pneumothorax"
        datalist.write_text(json.dumps(own))
        bad = self.run_configs(self.configs("inference"), *FAST, *overrides[:4], "--output_dir", str(self.tmp / "bad"))
        self.assertNotEqual(bad.returncode, 0)
        self.assertIn("`phrase` 'pneumothorax' does not occur in the prompt", bad.stdout + bad.stderr)
        self.assertFalse((self.tmp / "bad").exists() and list((self.tmp / "bad").iterdir()))


class TestModelZooCXRReplica(GroundingCase):
    """configs/cxr_ldm.json on a tiny network pair saved as the model-zoo bundle lays it out (models/autoencoder.pth,
    models/diffusion_model.pth with monai-generative keys) and a tiny CLIP text encoder in a Stable Diffusion folder."""

    def test_grounds_with_the_replica(self):
        zoo, clip = self.tmp / "cxr_ldm", self.tmp / "sd21"
        (zoo / "models").mkdir(parents=True)
        save_tiny_sd_text_encoder(str(clip), hidden_size=32)
        torch.manual_seed(0)
        autoencoder = AutoencoderKL(2, 1, 1, channels=(8, 8, 8, 8), latent_channels=3, num_res_blocks=2,
            norm_num_groups=8, attention_levels=(False,) * 4, with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False)  # fmt: skip
        unet = DiffusionModelUNet(2, 3, 3, channels=(16, 16, 16), num_res_blocks=2,
            attention_levels=(False, True, True), norm_num_groups=8, num_head_channels=(0, 16, 16),
            with_conditioning=True, cross_attention_dim=32)  # fmt: skip
        torch.save(legacy_keys(autoencoder.state_dict()), zoo / "models" / "autoencoder.pth")
        torch.save(legacy_keys(unet.state_dict()), zoo / "models" / "diffusion_model.pth")
        saved = torch.load(zoo / "models" / "diffusion_model.pth", weights_only=True)
        self.assertTrue(any(".to_out.0." in k for k in saved))

        image = self.tmp / "cxr.nii.gz"
        pixels = np.random.default_rng(0).uniform(0, 1000, (64, 64)).astype(np.float32)  # not in [0, 1]: scaled
        nib.save(nib.Nifti1Image(pixels, np.diag([0.5, 0.5, 1.0, 1.0])), image)
        datalist = self.tmp / "cxr.json"
        prompt = "a chest x ray with small pleural effusion in the left lung"
        datalist.write_text(
            json.dumps({"testing": [{"image": str(image), "prompt": prompt, "phrase": "pleural effusion"}]})
        )
        tiny = [
            "--autoencoder_def#channels", "[8,8,8,8]", "--autoencoder_def#norm_num_groups", "8",
            "--diffusion_def#channels", "[16,16,16]", "--diffusion_def#norm_num_groups", "8",
            "--diffusion_def#num_head_channels", "[0,16,16]", "--cross_attention_dim", "32",
            "--model_input#spatial_shape", "[64,64]",  # the replica is built for 64x64 images, not 512x512
        ]  # fmt: skip
        out = self.tmp / "cxr_out"
        result = self.run_configs(
            ["configs/inference.json", "configs/cxr_ldm.json"], *tiny, *FAST, "--cxr_ldm_dir", str(zoo),
            "--clip_dir", str(clip), "--datalist", str(datalist), "--dataset_dir", str(self.tmp),
            "--output_dir", str(out),
        )  # fmt: skip
        check_ok(self, result)
        record = json.loads((out / "grounding.json").read_text())[0]
        heatmap = nib.load(out / record["heatmap"])
        self.assertEqual(heatmap.shape, (64, 64))
        np.testing.assert_allclose(heatmap.affine, np.diag([0.5, 0.5, 1.0, 1.0]))
        self.assertTrue(np.isfinite(np.asarray(heatmap.dataobj)).all())

        # the same checkpoint read without the legacy key mapping is refused with the file's name
        wrong = self.run_configs(
            ["configs/inference.json", "configs/cxr_ldm.json"], *tiny, *FAST, "--cxr_ldm_dir", str(zoo),
            "--clip_dir", str(clip), "--datalist", str(datalist), "--dataset_dir", str(self.tmp),
            "--output_dir", str(self.tmp / "wrong"), "--legacy_keys", "False",
        )  # fmt: skip
        self.assertNotEqual(wrong.returncode, 0)
        self.assertIn("autoencoder.pth' does not fit AutoencoderKL", wrong.stdout + wrong.stderr)


class TestPhraseGroundingMetadata(unittest.TestCase):
    def test_verifies_offline(self):
        result = verify_metadata("configs/metadata.json", bundle=BUNDLE)
        check_ok(self, result)
        self.assertIn("metadata is verified with no error", result.stdout + result.stderr)


if __name__ == "__main__":
    unittest.main()
