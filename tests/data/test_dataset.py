from __future__ import annotations

import json
import os
import tempfile
import unittest
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, MetaTensor, load_decathlon_datalist
from monai.transforms import LoadImage
from parameterized import parameterized

from monai_cfx.data import (
    PhantomDataset,
    chest_phantom,
    ensure_phantom_datalist,
    generate_phantom,
    write_phantom_dataset,
)
from monai_cfx.data.__main__ import main as cli_main


class TestPhantomDataset(unittest.TestCase):
    @parameterized.expand([["chest", 32, (2, 1, 32, 32)], ["brain", 16, (2, 1, 16, 16, 16)]])
    def test_loader_batches(self, kind, size, batch_shape):
        dataset = PhantomDataset(kind, num=4, seed=10, size=size)
        self.assertEqual(len(dataset), 4)
        item = dataset[1]
        self.assertIsInstance(item["image"], MetaTensor)
        np.testing.assert_allclose(item["image"].affine.numpy(), generate_phantom(kind, 11, size)["affine"])
        np.testing.assert_array_equal(item["image"].numpy(), generate_phantom(kind, 11, size)["image"])
        batch = next(iter(DataLoader(dataset, batch_size=2)))
        self.assertEqual(tuple(batch["image"].shape), batch_shape)
        self.assertEqual(len(batch["report"]), 2)
        self.assertEqual(batch["label"].dtype, torch.float32)

    def test_transform_and_bad_arguments(self):
        dataset = PhantomDataset("chest", num=2, size=32, transform=lambda d: {**d, "flag": True}, findings=[])
        self.assertTrue(dataset[0]["flag"])
        self.assertEqual(dataset[0]["report"], "Normal chest radiograph.")
        with self.assertRaisesRegex(ValueError, "num"):
            PhantomDataset("chest", num=0)
        with self.assertRaisesRegex(ValueError, "kind"):
            PhantomDataset("lung", num=2)


class TestWriteDataset(unittest.TestCase):
    def test_chest_files_and_datalist(self):
        with tempfile.TemporaryDirectory() as out:
            summary = write_phantom_dataset(out, "chest", num=10, seed=3, size=48, num_workers=2)
            self.assertEqual((summary["num_training"], summary["num_validation"], summary["num_testing"]), (8, 1, 1))
            raw = json.loads(Path(summary["datalist"]).read_text())
            for key in ("image", "healthy", "mask", "label", "report", "phrases"):
                self.assertIn(key, raw["training"][0])
            items = load_decathlon_datalist(summary["datalist"], False, "testing", base_dir=out)
            item = items[0]
            subject = chest_phantom(item["seed"], 48)
            loader = LoadImage(image_only=True, ensure_channel_first=True)
            for key in ("image", "healthy", "mask"):
                loaded = loader(item[key])
                # NIfTI keeps values and affine exactly; PNG reads back to the same orientation (8-bit)
                np.testing.assert_array_equal(loaded.numpy(), subject[key])
                np.testing.assert_allclose(loaded.affine.numpy(), subject["affine"])
                png = loader(os.path.join(out, item[f"{key}_png"])).numpy() / 255.0
                np.testing.assert_allclose(png, subject[key], atol=1.0 / 255 + 1e-6)
            self.assertEqual(item["report"], subject["report"])
            self.assertEqual(item["label"], subject["labels"].astype(int).tolist())

    def test_ensure_datalist_with_split_and_domain(self):
        with tempfile.TemporaryDirectory() as out:
            path = ensure_phantom_datalist(
                out, "chest", num=7, seed=9, size=32, split=(4 / 7, 1 / 7, 2 / 7), domain="target"
            )
            raw = json.loads(Path(path).read_text())
            self.assertEqual([len(raw[key]) for key in ("training", "validation", "testing")], [4, 1, 2])
            self.assertEqual(raw["domain"], "target")
            self.assertEqual(ensure_phantom_datalist(out, "chest", num=99), path)  # an existing datalist is kept

    def test_brain_nifti_and_no_overwrite(self):
        with tempfile.TemporaryDirectory() as out:
            write_phantom_dataset(out, "brain", num=2, seed=0, size=16, num_workers=1, split=(0.5, 0.0, 0.5))
            before = Path(out, "datalist.json").read_bytes()
            with self.assertRaises(FileExistsError):
                write_phantom_dataset(out, "brain", num=2, seed=5, size=16, num_workers=1)
            self.assertEqual(Path(out, "datalist.json").read_bytes(), before)  # the user's file is untouched
            write_phantom_dataset(out, "brain", num=2, seed=5, size=16, num_workers=1, overwrite=True)
            self.assertNotEqual(Path(out, "datalist.json").read_bytes(), before)
            self.assertFalse([p for p in Path(out).rglob("*") if ".tmp" in p.name])  # no temp files left behind

    def test_bad_arguments_write_nothing(self):
        with tempfile.TemporaryDirectory() as out:
            with self.assertRaisesRegex(ValueError, "split"):
                write_phantom_dataset(out, "chest", num=4, split=(0.5, 0.6, 0.1))
            with self.assertRaisesRegex(ValueError, "findings"):
                write_phantom_dataset(out, "chest", num=4, findings=["fracture"])
            self.assertEqual(list(Path(out).iterdir()), [])


class TestCli(unittest.TestCase):
    def test_cli(self):
        with tempfile.TemporaryDirectory() as out:
            code = cli_main(["--kind", "chest", "--num", "3", "--out", out, "--size", "32", "--workers", "1"])
            self.assertEqual(code, 0)
            self.assertTrue(Path(out, "datalist.json").exists())
            self.assertEqual(len(list(Path(out, "images").glob("*.nii.gz"))), 9)
            self.assertEqual(len(list(Path(out, "png").glob("*.png"))), 9)
            # an existing datalist is an error, reported without a traceback
            self.assertEqual(cli_main(["--num", "3", "--out", out, "--size", "32"]), 2)
            domain = '{"noise": 0.0, "blur": 1.0}'
            target = str(Path(out, "target"))
            self.assertEqual(cli_main(["--num", "2", "--out", target, "--size", "32", "--domain", domain]), 0)


if __name__ == "__main__":
    unittest.main()
