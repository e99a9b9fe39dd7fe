"""Bundles on a local Stable Diffusion folder (``configs/stable_diffusion.json``), through MONAI's CLI from another
folder, on a tiny SD 1.x pipeline that diffusers' own classes saved."""

from __future__ import annotations

import json
import shutil
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from parameterized import parameterized

from monai_cfx.data import generate_phantom
from monai_cfx.utils import write_json, write_nifti
from tests.helpers import BUNDLES, check_ok, run_relocated
from tests.networks.nets.test_stable_diffusion import HAS_DIFFUSERS, save_pipeline


class StableDiffusionFolderCase(unittest.TestCase):
    """Tiny pipelines saved by diffusers into ``tmp/<kind>``, for the class; ``sd`` is the first one's folder."""

    kinds: tuple[str, ...] = ("sd1",)

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())
        for kind in cls.kinds:
            save_pipeline(str(cls.tmp / kind), kind)
        cls.sd = cls.tmp / cls.kinds[0]

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)


@unittest.skipUnless(HAS_DIFFUSERS, "diffusers (a test dependency, the dev extra) writes the fixture")
class TestCounterfactualOnStableDiffusion(StableDiffusionFolderCase):
    def run_configs(self, *overrides):
        configs = ["inference.json", "stable_diffusion.json"]
        common = ["--dataset_dir", str(self.tmp / "data"), "--num_subjects", "40", "--num_items", "2"]
        return run_relocated(BUNDLES / "counterfactual", configs, *common, *overrides, cwd=self.tmp)

    def test_counterfactuals_on_the_scans_grid(self):
        out = self.tmp / "out"
        check_ok(self, self.run_configs("--sd_path", str(self.sd), "--output_dir", str(out)))
        records = json.loads((out / "counterfactuals.json").read_text())
        self.assertEqual(len(records), 2)
        for record in records:
            scan = nib.load(record["image"])
            for key in ("counterfactual", "difference"):
                saved = nib.load(out / record[key])
                self.assertEqual(saved.shape, scan.shape)  # 128² phantoms, edited at the tiny model's 16²
                np.testing.assert_allclose(saved.affine, scan.affine)
                self.assertTrue(np.isfinite(np.asarray(saved.dataobj)).all())

    def test_the_folders_timestep_spacing_reaches_the_inferer(self):
        from monai_cfx.apps.bundle_config import load_bundle_config

        configs = ["configs/inference.json", "configs/stable_diffusion.json"]
        parser = load_bundle_config(BUNDLES / "counterfactual", configs, device="cpu", sd_path=str(self.sd))
        # the tiny folder's scheduler config names no spacing: Stable Diffusion's leading one
        self.assertEqual(parser.get_parsed_content("counterfactual_inferer").timestep_spacing, "leading")
        parser = load_bundle_config(BUNDLES / "counterfactual", configs[:1], device="cpu")
        self.assertEqual(parser.get_parsed_content("counterfactual_inferer").timestep_spacing, "linspace")

    def test_missing_or_wrong_folder_is_refused_with_nothing_written(self):
        for overrides, message in (
            ([], "no Stable Diffusion folder was given"),
            (["--sd_path", str(self.sd / "unet")], "is not a diffusers pipeline folder"),
        ):
            out = self.tmp / f"refused_{len(overrides)}"
            result = self.run_configs(*overrides, "--output_dir", str(out))
            self.assertNotEqual(result.returncode, 0)
            self.assertIn(message, result.stdout + result.stderr)
            self.assertFalse(out.exists())


@unittest.skipUnless(HAS_DIFFUSERS, "diffusers (a test dependency, the dev extra) writes the fixture")
class TestGroundingOnStableDiffusion(StableDiffusionFolderCase):
    def run_configs(self, *overrides):
        configs = ["inference.json", "stable_diffusion.json"]
        # the tiny UNet has cross-attention at level 0 and in the middle block (level 1); SD's level 2 is absent
        common = ["--dataset_dir", str(self.tmp / "data"), "--num_subjects", "40", "--num_items", "2"]
        common += ["--attention_layers", "[0]"]
        return run_relocated(BUNDLES / "phrase_grounding", configs, *common, *overrides, cwd=self.tmp)

    def test_heatmaps_on_the_scans_grid(self):
        out = self.tmp / "out"
        check_ok(self, self.run_configs("--sd_path", str(self.sd), "--output_dir", str(out)))
        records = json.loads((out / "grounding.json").read_text())
        self.assertEqual(len(records), 2)
        for record in records:
            scan = nib.load(record["image"])
            for key in ("heatmap", "mask"):
                saved = nib.load(out / record[key])
                self.assertEqual(saved.shape[:2], scan.shape[:2])  # 128² phantoms, grounded at the tiny model's 16²
                np.testing.assert_allclose(saved.affine, scan.affine)
                values = np.asarray(saved.dataobj)
                self.assertTrue(np.isfinite(values).all())
            self.assertGreater(np.ptp(np.asarray(nib.load(out / record["heatmap"]).dataobj)), 0)


@unittest.skipUnless(HAS_DIFFUSERS, "diffusers (a test dependency, the dev extra) writes the fixture")
class TestTraversalOnStableDiffusion(StableDiffusionFolderCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        data = cls.tmp / "scans"
        data.mkdir()
        cls.affine = np.diag([0.8, 0.8, 1.0, 1.0])  # the user's own grid, not the phantoms'
        write_nifti(generate_phantom("chest", 7000, size=128, findings=[])["image"], cls.affine, data / "scan.nii.gz")
        write_json({"testing": [{"image": "scan.nii.gz"}]}, data / "scans.json")
        cls.data = data

    def run_configs(self, *overrides):
        configs = ["inference.json", "stable_diffusion.json"]
        fast = ["--num_inference_steps", "10", "--swap_steps", "[2, 5, 8]", "--num_frames", "6"]
        return run_relocated(BUNDLES / "trajectory_traversal", configs, *fast, *overrides, cwd=self.tmp)

    def test_seeds_sample_the_folders_latent_shape(self):
        out = self.tmp / "seeds"
        check_ok(self, self.run_configs("--sd_path", str(self.sd), "--seeds", "[3]", "--output_dir", str(out)))
        record = json.loads((out / "traversal.json").read_text())["trajectories"][0]
        frames = nib.load(out / record["files"]["frames"])
        self.assertEqual(frames.shape, (16, 16, 1, 1, 6))  # the tiny folder's sample size 8 times its VAE's factor 2
        latents = torch.load(out / record["files"]["latents"], weights_only=True)
        self.assertEqual(tuple(latents["frame_latents"].shape[-3:]), (4, 8, 8))
        self.assertTrue(np.isfinite(np.asarray(frames.dataobj)).all())
        self.assertGreater(np.ptp(np.asarray(frames.dataobj)), 0)

    def test_scans_keep_their_grid(self):
        out = self.tmp / "scans_out"
        scans = ["--datalist", str(self.data / "scans.json"), "--dataset_dir", str(self.data)]
        check_ok(self, self.run_configs("--sd_path", str(self.sd), *scans, "--output_dir", str(out),
                                        "--inversion_fixed_point_iterations", "1"))  # fmt: skip
        record = json.loads((out / "traversal.json").read_text())["trajectories"][0]
        frames = nib.load(out / record["files"]["frames"])
        self.assertEqual(frames.shape[:2], (128, 128))  # traversed at the tiny model's 16², written back on the scan
        np.testing.assert_allclose(frames.affine, self.affine)


@unittest.skipUnless(HAS_DIFFUSERS, "diffusers (a test dependency, the dev extra) writes the fixture")
class TestDriftingOnStableDiffusion(StableDiffusionFolderCase):
    def run_configs(self, configs, *overrides):
        common = ["--dataset_dir", str(self.tmp / "target"), "--num_target_training", "4", "--num_target_held_out", "4"]
        configs = [*configs, "stable_diffusion.json"]
        return run_relocated(BUNDLES / "latent_drifting", configs, *common, *overrides, cwd=self.tmp)

    def test_drifting_fine_tune_samples_and_goes_back_to_diffusers(self):
        from diffusers import UNet2DConditionModel

        from monai_cfx.engines import load_finetuned
        from monai_cfx.networks.nets import load_stable_diffusion, save_unet_to_diffusers

        sd_path, path = self.sd, self.tmp / "finetuned.pt"
        training = ["--max_epochs", "1", "--batch_size", "2", "--mode", "full", "--drift", "0.02"]
        check_ok(self, self.run_configs(["inference.json", "finetune.json"], "--sd_path", str(sd_path), *training,
                                        "--finetuned_path", str(path)))  # fmt: skip
        out = self.tmp / "samples"
        check_ok(self, self.run_configs(["inference.json"], "--sd_path", str(sd_path), "--finetuned_path", str(path),
                                        "--num_inference_steps", "3", "--output_dir", str(out)))  # fmt: skip
        prompts = json.loads((out / "prompts.json").read_text())
        self.assertEqual(len(prompts), 5)
        sample = nib.load(next(out.glob("*.nii.gz")))
        self.assertEqual(sample.shape[:2], (16, 16))  # the tiny folder's image size
        self.assertTrue(np.isfinite(np.asarray(sample.dataobj)).all())
        # the fine-tuned weights differ from the folder's and go back into the diffusers layout exactly
        source = load_stable_diffusion(sd_path)
        tuned = load_stable_diffusion(sd_path, text_encoder=False).unet
        info = load_finetuned(path, tuned, source.text_encoder)
        self.assertEqual((info["mode"], info["drift"]), ("full", 0.02))
        pairs = zip(tuned.state_dict().values(), source.unet.state_dict().values())
        self.assertTrue(any(not torch.equal(a, b) for a, b in pairs))
        exported = save_unet_to_diffusers(tuned, self.tmp / "exported_unet", source.unet_config)
        diffusers_unet = UNet2DConditionModel.from_pretrained(exported).eval()
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        context = torch.randn(1, 77, source.unet_config["cross_attention_dim"])
        timesteps = torch.tensor([500])
        with torch.no_grad():
            expected = tuned.eval()(latents, timesteps, context=context)
            actual = diffusers_unet(latents, timesteps, encoder_hidden_states=context).sample
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


@unittest.skipUnless(HAS_DIFFUSERS, "diffusers (a test dependency, the dev extra) writes the fixture")
class TestMediffusionOnStableDiffusion(StableDiffusionFolderCase):
    def run_configs(self, config, *overrides):
        configs = [config, "stable_diffusion.json"]
        common = ["--sd_path", str(self.sd), "--dataset_dir", str(self.tmp / "data"), "--num_subjects", "40"]
        common += ["--seed", "5000", "--model_dir", str(self.tmp / "models")]
        return run_relocated(BUNDLES / "mediffusion", configs, *common, *overrides, cwd=self.tmp)

    def test_joint_network_trains_and_explains(self):
        from monai_cfx.apps.mediffusion import stable_diffusion_joint_network
        from monai_cfx.networks.nets import load_stable_diffusion

        training = ["--max_epochs", "1", "--epoch_length", "2", "--batch_size", "4", "--labelled_fraction", "0.25"]
        check_ok(self, self.run_configs("train.json", *training, "--output_dir", str(self.tmp / "train")))
        model = self.tmp / "models" / "joint_sd_sd1_0.25.pt"  # named after the folder
        self.assertTrue(model.is_file())
        # the saved joint network has the folder's UNet architecture and a head; it loads with every key
        sd = load_stable_diffusion(self.sd, text_encoder=False)
        joint = stable_diffusion_joint_network(sd, 4, joint_path=model, classifier_norm="batch")  # train.json's head
        context = torch.zeros(1, 77, sd.unet_config["cross_attention_dim"])
        logits = joint.classify(torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long), context=context)
        self.assertEqual(tuple(logits.shape), (1, 4))
        out = self.tmp / "explain"
        explain = ["--num_items", "2", "--num_inference_steps", "4", "--batch_size", "2", "--output_dir", str(out)]
        check_ok(self, self.run_configs("inference.json", *explain, "--model_name", "joint_sd_sd1_0.25",
                                        "--decision_threshold", "0.0"))  # fmt: skip
        manifest = json.loads((out / "explanations.json").read_text())
        self.assertEqual(len(manifest["items"]), 2)
        for item in manifest["items"]:
            self.assertEqual(len(item["removed"]), 4)  # threshold 0: every finding is removed
            image = nib.load(out / item["files"]["difference"])
            self.assertEqual(image.shape, (128, 128))  # explained at the tiny model's 16², written on the scan's grid
            self.assertTrue(np.isfinite(np.asarray(image.dataobj)).all())


@unittest.skipUnless(HAS_DIFFUSERS, "diffusers (a test dependency, the dev extra) writes the fixture")
class TestSamplingOnStableDiffusion(StableDiffusionFolderCase):
    """Also on an SD 2.x layout (linear projections, v-prediction), which the other bundles' tests leave out."""

    kinds = ("sd1", "sd2")

    @parameterized.expand([("sd1",), ("sd2",)])
    def test_prompts_are_sampled_at_the_folders_size(self, kind):
        out = self.tmp / f"samples_{kind}"
        prompts = '["Normal chest radiograph.", "Chest radiograph with cardiomegaly."]'
        overrides = ["--sd_path", str(self.tmp / kind), "--prompts", prompts, "--num_inference_steps", "3"]
        configs = ["inference.json", "stable_diffusion.json"]
        check_ok(self, run_relocated(BUNDLES / "latent_diffusion", configs, *overrides, "--output_dir", str(out),
                                     cwd=self.tmp))  # fmt: skip
        self.assertEqual(len(json.loads((out / "prompts.json").read_text())), 2)
        samples = sorted(out.glob("*.nii.gz"))
        self.assertEqual(len(samples), 2)
        for path in samples:
            values = np.asarray(nib.load(path).dataobj)
            self.assertEqual(values.shape[:2], (16, 16))  # the tiny folder's sample size 8 times its VAE's factor 2
            self.assertTrue(np.isfinite(values).all())


if __name__ == "__main__":
    unittest.main()
