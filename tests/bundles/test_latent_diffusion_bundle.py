"""The latent diffusion bundle's configs, run through MONAI's CLI as a user runs them, at tiny sizes."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from monai_cfx.data import phantom_affine
from tests.helpers import LATENT_DIFFUSION_BUNDLE, check_ok, run_bundle, verify_metadata

BUNDLE = LATENT_DIFFUSION_BUNDLE
TINY = ["--max_epochs", "1", "--epoch_length", "2", "--batch_size", "2", "--log_every", "1"]
TINY_SAMPLING = ["--num_inference_steps", "2", "--sample_batch_size", "4"]


class BundleCase(unittest.TestCase):
    """Trains tiny networks once per class into a temporary model_dir, on a tiny phantom dataset."""

    extra: list[str] = []
    configs_3d: list[str] = []
    image_size = 32

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())
        cls.common = [
            "--model_dir", str(cls.tmp / "models"),
            "--dataset_dir", str(cls.tmp / "data"),
            "--num_subjects", "30",
            "--image_size", str(cls.image_size),
        ]  # fmt: skip

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def configs(self, name):
        names = ["inference"] if name == "inference" else ["inference", name]
        return [*(f"configs/{n}.json" for n in names), *self.configs_3d]

    def train_all(self):
        for name in ("train_autoencoder", "train_diffusion", "train_oracle"):
            check_ok(self, run_bundle(self.configs(name), *self.common, *TINY))


class TestBundle2D(BundleCase):
    dims_tag, kind = "2d", "chest"

    def test_train_infer_evaluate(self):
        self.train_all()
        models = self.tmp / "models"
        for name in ("autoencoder", "diffusion", "oracle"):
            self.assertTrue((models / f"{name}_{self.dims_tag}.pt").is_file(), name)
        scale = json.loads((models / f"scale_factor_{self.dims_tag}.json").read_text())["scale_factor"]
        self.assertTrue(np.isfinite(scale) and scale > 0)

        out = self.tmp / "samples"
        check_ok(self, run_bundle(self.configs("inference"), *self.common, *TINY_SAMPLING, "--output_dir", str(out)))
        records = json.loads((out / "prompts.json").read_text())
        self.assertGreaterEqual(len(records), 4)
        volume = nib.load(out / records[0]["image"])
        np.testing.assert_allclose(volume.affine, phantom_affine(self.kind, self.image_size))
        spatial = tuple(s for s in volume.shape if s > 1)
        self.assertEqual(spatial, (self.image_size,) * (2 if self.dims_tag == "2d" else 3))
        self.assertTrue(np.isfinite(np.asarray(volume.dataobj)).all())

        # running again into the same folder refuses, and leaves the samples as they were
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        again = run_bundle(self.configs("inference"), *self.common, *TINY_SAMPLING, "--output_dir", str(out))
        self.assertNotEqual(again.returncode, 0)
        self.assertIn("exists", again.stdout + again.stderr)
        self.assertEqual(before, {p.name: p.stat().st_mtime_ns for p in out.iterdir()})

        evaluation = self.tmp / "evaluation"
        overrides = ["--output_dir", str(evaluation), "--samples_per_prompt_class", "2"]
        check_ok(self, run_bundle(self.configs("evaluate"), *self.common, *TINY_SAMPLING, *overrides))
        metrics = json.loads((evaluation / "metrics.json").read_text())
        self.assertEqual(metrics["dims"], self.dims_tag)
        self.assertEqual(set(metrics["generator"]["prompt_fidelity"]), {*metrics["oracle"]["auroc"], "normal"})
        for value in metrics["generator"]["prompt_fidelity"].values():
            self.assertTrue(0.0 <= value <= 1.0)
        self.assertGreaterEqual(metrics["generator"]["fid_oracle_features"], 0.0)
        ceilings = metrics["generator"]["fidelity_ceilings"]
        self.assertEqual(set(ceilings), {"num_images", "held_out_images", "autoencoder_reconstructions"})
        self.assertIn("normal", ceilings["autoencoder_reconstructions"]["prompt_fidelity_exact"])
        self.assertTrue(0.0 <= metrics["generator"]["off_manifold_fraction"] <= 1.0)
        self.assertGreater((evaluation / "off_manifold.png").stat().st_size, 0)

        # a checkpoint for another architecture is refused with the file's name
        wrong = run_bundle(
            self.configs("inference"), *self.common, *TINY_SAMPLING,
            "--output_dir", str(self.tmp / "wrong"), "--autoencoder_channels", "[16,16]",
        )  # fmt: skip
        self.assertNotEqual(wrong.returncode, 0)
        self.assertIn(f"autoencoder_{self.dims_tag}.pt", wrong.stdout + wrong.stderr)
        self.assertIn("does not fit AutoencoderKL", wrong.stdout + wrong.stderr)
        self.assertFalse((self.tmp / "wrong").exists())


class TestBundle3D(TestBundle2D):
    dims_tag, kind = "3d", "brain"
    configs_3d = ["configs/3d.json"]
    image_size = 16


class TestBundleBadInput(BundleCase):
    def test_prompt_and_seed_counts(self):
        check_ok(self, run_bundle(self.configs("train_autoencoder"), *self.common, *TINY))
        check_ok(self, run_bundle(self.configs("train_diffusion"), *self.common, *TINY))
        out = self.tmp / "samples"
        result = run_bundle(
            self.configs("inference"), *self.common, *TINY_SAMPLING, "--output_dir", str(out), "--seeds", "[0]"
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("`seeds` must have one entry per prompt", result.stdout + result.stderr)
        self.assertFalse(out.exists())

    def test_datalist_without_reports_and_unreadable_image(self):
        check_ok(self, run_bundle(self.configs("train_autoencoder"), *self.common, *TINY))
        datalist = json.loads((self.tmp / "data" / "datalist.json").read_text())
        for item in datalist["training"]:
            item.pop("report")
        no_reports = self.tmp / "data" / "no_reports.json"
        no_reports.write_text(json.dumps(datalist))
        result = run_bundle(self.configs("train_diffusion"), *self.common, *TINY, "--datalist", str(no_reports))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("report", result.stdout + result.stderr)

        broken = self.tmp / "data" / "images" / "broken.nii.gz"
        broken.write_bytes(b"not a nifti file")
        datalist["training"][0]["image"] = "images/broken.nii.gz"
        unreadable = self.tmp / "data" / "unreadable.json"
        unreadable.write_text(json.dumps(datalist))
        result = run_bundle(self.configs("train_oracle"), *self.common, *TINY, "--datalist", str(unreadable))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("broken.nii.gz", result.stdout + result.stderr)
        self.assertFalse((self.tmp / "models" / "oracle_2d.pt").exists())


class TestContinueTraining(BundleCase):
    def test_pretrained_path(self):
        check_ok(self, run_bundle(self.configs("train_autoencoder"), *self.common, *TINY))
        first = (self.tmp / "models" / "autoencoder_2d.pt").read_bytes()
        continued = self.tmp / "models" / "continued.pt"
        result = run_bundle(
            self.configs("train_autoencoder"), *self.common, *TINY,
            "--pretrained_path", str(self.tmp / "models" / "autoencoder_2d.pt"),
            "--load_autoencoder_path", str(continued), "--hard_voxel_weight", "1.0",
        )  # fmt: skip
        check_ok(self, result)
        self.assertNotEqual(continued.read_bytes(), first)  # trained further from the saved weights
        # the continuation's loss weighs the worst-reconstructed voxels, a setting its training state records
        state = torch.load(self.tmp / "models" / "continued_training_state.pt", weights_only=True)
        self.assertEqual(state["fingerprint"]["hard_voxel_weight"], 1.0)
        # weights of another network are refused with the file's name
        wrong = run_bundle(self.configs("train_oracle"), *self.common, *TINY, "--pretrained_path", str(continued))
        self.assertNotEqual(wrong.returncode, 0)
        self.assertIn("continued.pt", wrong.stdout + wrong.stderr)
        self.assertIn("does not fit FindingClassifier", wrong.stdout + wrong.stderr)


class TestDiffusionRecipe(BundleCase):
    def test_validation_ema_best_checkpoint_and_exact_continuation(self):
        """train_diffusion.json validates every epoch on fixed draws without changing the training run, keeps the
        best epoch's weights, publishes the EMA weights when asked, and a run continued from 1 to 2 epochs (the
        EMA, the evaluator's best and every random state restored) ends where a 2-epoch run ends."""
        check_ok(self, run_bundle(self.configs("train_autoencoder"), *self.common, *TINY))
        full = ["--max_epochs", "2", "--batch_size", "4", "--log_every", "1"]  # full epochs: exactness needs them
        autoencoder = str(self.tmp / "models" / "autoencoder_2d.pt")

        def train(name, *overrides):
            path = self.tmp / name / "diffusion_2d.pt"
            result = run_bundle(self.configs("train_diffusion"), *self.common, *full, "--load_diffusion_path",
                                str(path), "--load_autoencoder_path", autoencoder, *overrides)  # fmt: skip
            check_ok(self, result)
            return path, result.stdout + result.stderr

        validated, log = train("validated")
        self.assertEqual(log.count("Metrics -- val_loss"), 2)
        self.assertTrue((validated.parent / "diffusion_2d_best.pt").is_file())
        plain, log = train("plain", "--val_interval", "0")
        self.assertNotIn("val_loss", log)
        # validation draws its own seeded numbers and gives the training run's back: the same weights
        self.assertEqual(validated.read_bytes(), plain.read_bytes())

        ema, _ = train("ema", "--publish_ema", "True")
        self.assertNotEqual(ema.read_bytes(), validated.read_bytes())  # the average, not the last weights
        continued, _ = train("continued", "--publish_ema", "True", "--max_epochs", "1")
        _, log = train("continued", "--publish_ema", "True")
        self.assertIn("resuming training from", log)
        for name in ("diffusion_2d.pt", "diffusion_2d_best.pt"):
            first = torch.load(ema.parent / name, weights_only=True)
            second = torch.load(continued.parent / name, weights_only=True)
            for key in first:
                torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=f"{name}: {key}")


class TestAttentionAllLevels(BundleCase):
    def test_grows_the_unet_from_the_shipped_layout(self):
        """configs/attention_all_levels.json: attention at the first level too, saved to its own file; a UNet with
        the shipped layout seeds it only with ``--pretrained_strict False``."""
        check_ok(self, run_bundle(self.configs("train_autoencoder"), *self.common, *TINY))
        check_ok(self, run_bundle(self.configs("train_diffusion"), *self.common, *TINY))
        models = self.tmp / "models"
        grown = [*self.configs("train_diffusion"), "configs/attention_all_levels.json"]
        strict = run_bundle(grown, *self.common, *TINY, "--pretrained_path", str(models / "diffusion_2d.pt"))
        self.assertNotEqual(strict.returncode, 0)
        self.assertIn("does not fit DiffusionModelUNet", strict.stdout + strict.stderr)
        self.assertFalse((models / "diffusion_all_levels_2d.pt").exists())
        before = {p.name: p.read_bytes() for p in models.iterdir()}
        check_ok(self, run_bundle(grown, *self.common, *TINY, "--pretrained_path", str(models / "diffusion_2d.pt"),
                                  "--pretrained_strict", "False"))  # fmt: skip
        state = torch.load(models / "diffusion_all_levels_2d.pt", weights_only=True)
        shipped_layout = torch.load(models / "diffusion_2d.pt", weights_only=True)
        self.assertTrue(any(k.startswith("down_blocks.0.attentions.") for k in state))
        self.assertFalse(any(k.startswith("down_blocks.0.attentions.") for k in shipped_layout))
        self.assertEqual(set(shipped_layout) - set(state), set())  # every shipped weight has its place
        self.assertEqual(before, {p.name: p.read_bytes() for p in models.iterdir() if p.name in before})


class TestMultiProcessTraining(BundleCase):
    def test_two_process_gloo(self):
        check_ok(self, run_bundle(self.configs("train_autoencoder"), *self.common, *TINY))
        with socket.socket() as probe:  # a free port for the rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
        configs = ["configs/inference.json", "configs/train_diffusion.json", "configs/multi_gpu_train.json"]
        result = run_bundle(configs, *self.common, *TINY, launcher=launcher)
        check_ok(self, result)
        log = result.stdout + result.stderr
        # each rank ran two iterations on its half of the data; rank 0 alone saved
        self.assertEqual(log.count("Epoch: 1/1, Iter: 2/2"), 2, log[-3000:])
        self.assertEqual(log.count("saved final checkpoint"), 1, log[-3000:])
        self.assertTrue((self.tmp / "models" / "diffusion_2d.pt").is_file())


class TestMetadata(unittest.TestCase):
    def verify(self, meta_file):
        return verify_metadata(meta_file)

    def test_verifies_offline_and_rejects_a_broken_file(self):
        result = self.verify("configs/metadata.json")
        check_ok(self, result)
        self.assertIn("metadata is verified with no error", result.stdout + result.stderr)
        metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
        metadata.pop("version")
        with tempfile.TemporaryDirectory() as tmp:
            broken = Path(tmp) / "metadata.json"
            broken.write_text(json.dumps(metadata))
            result = self.verify(broken)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("'version' is a required property", result.stdout + result.stderr)


if __name__ == "__main__":
    unittest.main()
