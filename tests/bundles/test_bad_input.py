"""Bad and unusual inputs through the counterfactual and phrase grounding bundles (MONAI's ConfigWorkflow, as the
CLI runs them) and the Python API: each is refused with the error type expected, a message naming the file, item
or key, and nothing written; or, where the input is usable (empty, non-ASCII or long prompts), it runs as
documented."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from monai_cfx.data import write_phantom_dataset
from monai_cfx.inferers import CounterfactualInferer
from tests.helpers import BUNDLES, CONTEXT_DIM, tiny_networks

AFFINE = np.diag([3.0, 3.0, 1.0, 1.0])
MONAI_WRAPS = ("Failed to evaluate", "Failed to instantiate", "applying transform")


def _save(path: Path, array, affine=AFFINE) -> str:
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine), path)
    return path.name


class BadInputCase(unittest.TestCase):
    bundle = "counterfactual"
    manifest = "counterfactuals.json"

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())
        write_phantom_dataset(cls.tmp, "chest", num=3, seed=7000, size=64, split=(0.0, 0.0, 1.0), num_workers=1)
        cls.good = json.loads((cls.tmp / "datalist.json").read_text())["testing"]

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def workflow(self, datalist: Path, output_dir: Path, *extra_configs: str, **overrides) -> ConfigWorkflow:
        root = BUNDLES / self.bundle
        configs = [str(root / "configs" / name) for name in ("inference.json", *extra_configs)]
        settings = {"datalist": str(datalist), "dataset_dir": str(self.tmp), "output_dir": str(output_dir)}
        settings.update({"num_inference_steps": 2, "bundle_root": str(root), **overrides})
        return ConfigWorkflow(
            config_file=configs,
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type=None,
            **settings,
        )

    def datalist(self, name: str, items) -> Path:
        path = self.tmp / f"{name}.json"
        path.write_text(json.dumps({"testing": items}) if not isinstance(items, str) else items)
        return path

    def assert_refused(self, error, message, datalist, *extra_configs, output_dir=None, **overrides):
        """Run the bundle; it must raise ``error`` with ``message`` and leave no output and no staging folder."""
        output_dir = Path(output_dir or self.tmp / f"out_{self.id().rsplit('.', 1)[-1]}")
        before = sorted(os.listdir(output_dir.parent)) if output_dir.parent.exists() else None
        try:
            workflow = self.workflow(datalist, output_dir, *extra_configs, **overrides)
            workflow.initialize()
            workflow.run()
        except Exception as raised:  # noqa: BLE001 - MONAI wraps errors in config expressions: check the first
            root = raised  # error below its wrappers, which is what the run reports as the cause
            while isinstance(root, RuntimeError) and root.__cause__ is not None and str(root).startswith(MONAI_WRAPS):
                root = root.__cause__
            self.assertIsInstance(root, error, f"{type(root).__name__}: {root}")
            self.assertRegex(str(root), message)
        else:
            self.fail(f"no {error.__name__} raised")
        if output_dir.parent.exists() and output_dir.parent != Path("/proc"):
            self.assertEqual(sorted(os.listdir(output_dir.parent)), before, "the run left files behind")


class TestCounterfactualBadInput(BadInputCase):
    def item(self, image: str, **fields):
        return [{**self.good[0], "image": image, **fields}, self.good[1]]

    def test_scans_that_cannot_be_used(self):
        grid = np.random.default_rng(0).random((64, 64))
        nan = grid.copy()
        nan[5, 5] = np.nan
        mostly_flat = np.zeros((64, 64))
        mostly_flat[0, 0] = 1.0
        cases = {
            "nan": (nan, "1 non-finite voxels"),
            "constant": (np.full((64, 64), 0.5), "constant"),
            "volume": (np.random.rand(64, 64, 64), "spatial dimensions"),
            "series": (np.random.rand(64, 64, 8, 3), "spatial dimensions"),
            "small": (np.random.rand(16, 16), "at least 64"),
            "flat": (mostly_flat, "percentiles are equal"),
            "two_channels": (np.random.rand(64, 64, 1, 1, 2), "2 channels|spatial dimensions"),
        }
        for name, (array, message) in cases.items():
            with self.subTest(case=name):
                image = _save(self.tmp / f"{name}.nii.gz", array)
                self.assert_refused(ValueError, f"{name}.nii.gz.*{message}", self.datalist(name, self.item(image)))
        anisotropic = _save(self.tmp / "anisotropic.nii.gz", grid, affine=np.diag([1.0, 4.0, 1.0, 1.0]))
        self.assert_refused(ValueError, "anisotropic.nii.gz.*isotropic", self.datalist("aniso", self.item(anisotropic)))

    def test_files_that_cannot_be_read(self):
        (self.tmp / "empty.nii.gz").write_bytes(b"")
        (self.tmp / "corrupt.nii.gz").write_bytes(os.urandom(300))
        (self.tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(50))
        for name in ("empty.nii.gz", "corrupt.nii.gz", "corrupt.png", "missing.nii.gz"):
            with self.subTest(file=name):
                self.assert_refused(ValueError, f"item 0 .*{name}", self.datalist("unreadable", self.item(name)))

    def test_datalists(self):
        cases = [
            ("corrupt", "{testing: [", ValueError, "corrupt.json.*not valid JSON"),
            ("empty_list", [], ValueError, "empty_list.json.*non-empty list"),
            ("empty_image", [{"image": ""}], ValueError, "empty_image.json.*item 0.*'image' must be a non-empty"),
            ("two_prompts", self.item(self.good[0]["image"], prompt=["a", "b"]), ValueError, "'prompt' must be one"),
            ("number_prompt", self.item(self.good[0]["image"], prompt=3), ValueError, "'prompt' must be one"),
        ]
        for name, items, error, message in cases:
            with self.subTest(case=name):
                self.assert_refused(error, message, self.datalist(name, items))
        self.assert_refused(FileNotFoundError, "nowhere.json", self.tmp / "nowhere.json")
        wrong_key = self.tmp / "training_only.json"
        wrong_key.write_text(json.dumps({"training": self.good}))
        self.assert_refused(ValueError, "training_only.json.*no 'testing' list", wrong_key)

    def test_output_folders(self):
        datalist = self.datalist("good", self.good)
        a_file = self.tmp / "a_file"
        a_file.write_text("mine")
        self.assert_refused(NotADirectoryError, "a_file", datalist, output_dir=a_file)
        self.assertEqual(a_file.read_text(), "mine")
        self.assert_refused(PermissionError, "not writable", datalist, output_dir="/proc/monai_cfx_out")
        done = self.tmp / "done"
        done.mkdir()
        (done / "counterfactuals.json").write_text("[]")
        self.assert_refused(FileExistsError, "counterfactuals.json", datalist, output_dir=done)
        self.assertEqual(sorted(os.listdir(done)), ["counterfactuals.json"])

    def test_checkpoints(self):
        datalist = self.datalist("good", self.good)
        shipped = BUNDLES / "latent_diffusion" / "models" / "diffusion_2d.pt"
        truncated = self.tmp / "truncated.pt"
        truncated.write_bytes(shipped.read_bytes()[:5000])
        self.assert_refused(ValueError, "truncated.pt", datalist, load_diffusion_path=str(truncated))
        marker = self.tmp / "code_ran"
        pickled = self.tmp / "pickled_code.pt"
        torch.save({"weight": _RunsCode(str(marker))}, pickled)
        self.assert_refused(ValueError, "pickled_code.pt.*weights-only", datalist, load_diffusion_path=str(pickled))
        self.assertFalse(marker.exists(), "the checkpoint's code ran")
        other = self.tmp / "other_architecture.pt"
        torch.save(tiny_networks(2)[1].state_dict(), other)
        self.assert_refused(ValueError, "other_architecture.pt.*does not fit", datalist, load_diffusion_path=str(other))

    def test_guidance_scale(self):
        datalist = self.datalist("good", self.good)
        self.assert_refused(ValueError, "guidance_scale.*>= 0", datalist, guidance_scale=-1.0)
        self.assert_refused(ValueError, "guidance_scale.*finite", datalist, guidance_scale=float("nan"))

    def test_not_a_scan_of_the_models_kind(self):
        import skimage.data

        Image.fromarray(skimage.data.camera()).save(self.tmp / "camera.png")
        self.assert_refused(
            ValueError, "out of distribution.*camera.png", self.datalist("photo", self.item("camera.png"))
        )

    def test_prompts_that_run(self):
        """An empty prompt takes the default, a non-ASCII one is read as written, and a prompt past the text
        encoder's 32 tokens runs with a warning that names it."""
        long_prompt = "Normal chest radiograph " + "with clear lungs and a normal heart " * 6
        items = [
            {**self.good[0], "prompt": ""},
            {**self.good[1], "prompt": "Radiographie thoracique normale, épanchement résorbé."},
            {**self.good[2], "prompt": long_prompt},
        ]
        out = self.tmp / "prompts"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            workflow = self.workflow(self.datalist("prompts", items), out)
            workflow.initialize()
            workflow.run()
        truncated = [str(w.message) for w in caught if "truncated to 32 tokens" in str(w.message)]
        self.assertTrue(any("Normal chest radiograph with" in message for message in truncated), truncated)
        records = json.loads((out / "counterfactuals.json").read_text())
        self.assertEqual([r["prompt"] for r in records][:2], ["Normal chest radiograph.", items[1]["prompt"]])

    def test_mistyped_override_on_the_command_line(self):
        root = BUNDLES / self.bundle
        out = self.tmp / "mistyped"
        command = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(root)]
        command += ["--config_file", str(root / "configs" / "inference.json"), "--output_dir", str(out)]
        command += ["--datalist", str(self.datalist("good", self.good)), "--noise_strenght", "0.2"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=self.tmp)
        self.assertNotEqual(result.returncode, 0)
        self.assertRegex(result.stderr, r"--noise_strenght.*'noise_strength'")
        self.assertFalse(out.exists())


class _RunsCode:
    """A pickled object that would create a file when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


class TestGroundingBadInput(BadInputCase):
    bundle = "phrase_grounding"
    manifest = "grounding.json"

    def test_phrase_missing_from_the_prompt_is_refused_before_anything_runs(self):
        items = [
            {"image": self.good[0]["image"], "phrase": "cardiomegaly", "prompt": "Cardiomegaly."},
            {"image": self.good[1]["image"], "phrase": "left pleural effusion", "prompt": "Normal chest radiograph."},
        ]
        self.assert_refused(ValueError, "item 1 .*left pleural effusion", self.datalist("missing_phrase", items))

    def test_unusable_scans_name_their_file(self):
        nan = np.random.default_rng(0).random((64, 64))
        nan[0, 0] = np.inf
        items = [{"image": _save(self.tmp / "inf.nii.gz", nan), "phrase": "cardiomegaly", "prompt": "Cardiomegaly."}]
        self.assert_refused(ValueError, "inf.nii.gz.*non-finite", self.datalist("inf", items))
        items = [{"image": self.good[0]["image"], "phrase": ["a", 3], "prompt": "a"}]
        self.assert_refused(ValueError, "item 0", self.datalist("bad_phrase", items))


class TestInfererInputs(unittest.TestCase):
    """The Python API: float64 / float16 images are cast (the result is the float32 one), a text context of the
    wrong width and a bad guidance scale are refused by name."""

    def setUp(self):
        torch.manual_seed(0)
        self.autoencoder, self.unet = tiny_networks(2)
        from monai.networks.schedulers import DDIMScheduler

        self.inferer = CounterfactualInferer(DDIMScheduler(num_train_timesteps=100), num_inference_steps=4)
        self.images = torch.rand(2, 1, 16, 16)
        self.context = torch.randn(1, 4, CONTEXT_DIM)

    def run_with(self, images, context):
        return self.inferer(images, self.unet, self.autoencoder, conditioning=context, seed=0)

    def test_float64_and_float16_are_cast(self):
        reference = self.run_with(self.images, self.context)
        for dtype in (torch.float64, torch.float16):
            with self.subTest(dtype=dtype):
                result = self.run_with(self.images.to(dtype), self.context.to(dtype))
                self.assertEqual(result.dtype, dtype)
                self.assertTrue(
                    torch.allclose(result.float(), reference, atol=1e-2 if dtype == torch.float16 else 1e-6)
                )

    def test_refusals(self):
        with self.assertRaisesRegex(ValueError, r"`conditioning` must be a \(B or 1, L, \d+\) text context"):
            self.run_with(self.images, torch.randn(1, 4, 7))
        with self.assertRaisesRegex(ValueError, "guidance_scale.*>= 0"):
            CounterfactualInferer(self.inferer.scheduler, guidance_scale=-2.0)
        with self.assertRaisesRegex(ValueError, "guidance_scale.*finite"):
            CounterfactualInferer(self.inferer.scheduler, guidance_scale=float("inf"))


if __name__ == "__main__":
    unittest.main()
