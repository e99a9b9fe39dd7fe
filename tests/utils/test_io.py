from __future__ import annotations

import json
import math
import os
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from monai.data import ITKReader
from monai.transforms import LoadImage
from parameterized import parameterized

from monai_cfx.utils import (
    atomic_directory,
    atomic_path,
    check_finite,
    check_image_pair,
    check_images,
    check_option,
    write_json,
    write_metrics,
    write_nifti,
    write_png,
)


class TestWriters(unittest.TestCase):
    @parameterized.expand([["2d", (1, 12, 10)], ["3d", (1, 6, 7, 8)], ["2d_multichannel", (3, 12, 10)]])
    def test_nifti_round_trip_keeps_values_and_affine(self, _, shape):
        array = np.random.default_rng(0).random(shape).astype(np.float32)
        affine = np.diag([-2.0, 1.5, 3.0, 1.0])
        affine[:3, 3] = [10.0, -4.0, 2.0]
        with tempfile.TemporaryDirectory() as out:
            path = write_nifti(array, affine, Path(out) / "sub" / "x.nii.gz")
            loaded = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
            # several channels sit in NIfTI's 5th dimension, which MONAI returns with singleton axes
            self.assertEqual(tuple(loaded.squeeze().shape), tuple(s for s in shape if s > 1))
            np.testing.assert_array_equal(loaded.numpy().reshape(shape), array)
            np.testing.assert_allclose(loaded.affine.numpy()[: len(shape)], affine[: len(shape)], atol=1e-6)
            if shape[0] == 1:  # ITK (3D Slicer's reader) agrees on the geometry
                itk_image = LoadImage(reader=ITKReader(), image_only=True)(str(path))
                np.testing.assert_allclose(itk_image.numpy(), array[0], atol=1e-6)

    def test_metrics_with_settings_and_nan_as_null(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "metrics.json"
            metrics = {"auroc": 0.9, "undefined": math.nan, "per_image": {"auroc": [0.8, math.nan]}}
            record = write_metrics(metrics, path, settings={"seed": 0})
            self.assertEqual(json.loads(path.read_text()), record)
            self.assertEqual(record["settings"], {"seed": 0})
            self.assertIsNone(record["undefined"])
            self.assertEqual(record["per_image"]["auroc"], [0.8, None])
            with self.assertRaises(FileExistsError):
                write_metrics(metrics, path)

    def test_png_orientation_matches_monai_loader(self):
        array = np.zeros((1, 20, 10), dtype=np.float32)
        array[0, 15, 2] = 1.0  # axis 0 is the horizontal axis in MONAI's convention
        with tempfile.TemporaryDirectory() as out:
            path = write_png(array, Path(out) / "x.png")
            loaded = LoadImage(image_only=True, ensure_channel_first=True)(str(path)).numpy() / 255.0
            np.testing.assert_array_equal(loaded, array)
            with self.assertRaisesRegex(ValueError, "shape"):
                write_png(np.zeros((2, 4, 4)), Path(out) / "y.png")

    def test_no_overwrite_and_atomicity(self):
        with tempfile.TemporaryDirectory() as out:
            target = Path(out) / "result.json"
            write_json({"a": 1}, target)
            with self.assertRaises(FileExistsError):
                write_json({"a": 2}, target)
            self.assertIn('"a": 1', target.read_text())
            # a failure while writing leaves the previous file intact and no temporary behind
            with self.assertRaises(RuntimeError):
                with atomic_path(target, overwrite=True) as tmp:
                    tmp.write_text("partial")
                    raise RuntimeError("interrupted")
            self.assertIn('"a": 1', target.read_text())
            self.assertEqual([p.name for p in Path(out).iterdir()], ["result.json"])
            write_json({"a": 3}, target, overwrite=True)
            self.assertIn('"a": 3', target.read_text())
            # the written file has the permissions of a plain open(), not mkstemp's private 0600
            plain = Path(out) / "plain.txt"
            plain.write_text("x")
            self.assertEqual(target.stat().st_mode & 0o777, plain.stat().st_mode & 0o777)


class TestAtomicDirectory(unittest.TestCase):
    def test_all_or_nothing(self):
        with tempfile.TemporaryDirectory() as root:
            out = Path(root, "run")
            with atomic_directory(out) as folder:
                (folder / "a.txt").write_text("a")
                self.assertFalse(out.exists())  # nothing visible before the run ends
            self.assertEqual(sorted(p.name for p in out.iterdir()), ["a.txt"])
            # an existing folder is refused before the block runs, and left as it was
            with self.assertRaises(FileExistsError), atomic_directory(out):
                self.fail("the block must not run")
            # a failing run leaves neither its folder nor a temporary one
            with self.assertRaisesRegex(RuntimeError, "boom"), atomic_directory(Path(root, "failed")) as folder:
                (folder / "half.txt").write_text("half")
                raise RuntimeError("boom")
            self.assertEqual(sorted(p.name for p in Path(root).iterdir()), ["run"])
            # overwrite replaces the folder only once the new one is complete
            with self.assertRaisesRegex(RuntimeError, "boom"), atomic_directory(out, overwrite=True) as folder:
                raise RuntimeError("boom")
            self.assertEqual((out / "a.txt").read_text(), "a")
            with atomic_directory(out, overwrite=True) as folder:
                (folder / "b.txt").write_text("b")
            self.assertEqual(sorted(p.name for p in out.iterdir()), ["b.txt"])
            self.assertEqual(sorted(p.name for p in Path(root).iterdir()), ["run"])
            # the final rename failing (a full disk, an interrupt) brings the previous folder back
            real_replace, calls = os.replace, []

            def failing_second_replace(source, target):
                calls.append(target)
                if len(calls) == 2:
                    raise OSError("no space left")
                return real_replace(source, target)

            with mock.patch("monai_cfx.utils.io.os.replace", failing_second_replace), self.assertRaises(OSError):
                with atomic_directory(out, overwrite=True) as folder:
                    (folder / "c.txt").write_text("c")
            self.assertEqual(sorted(p.name for p in out.iterdir()), ["b.txt"])
            self.assertEqual(sorted(p.name for p in Path(root).iterdir()), ["run"])
            Path(root, "file").write_text("x")
            with self.assertRaises(NotADirectoryError), atomic_directory(Path(root, "file"), overwrite=True):
                pass


class TestValidation(unittest.TestCase):
    def test_messages_name_the_argument(self):
        with self.assertRaisesRegex(ValueError, r"`mode` must be one of \['a', 'b'\], got 'c'"):
            check_option("mode", "c", ["a", "b"])
        with self.assertRaisesRegex(ValueError, "`latent` must be finite"):
            check_finite("latent", np.array([1.0, np.nan]))
        check_finite("latent", np.ones(3))
        with self.assertRaisesRegex(ValueError, "`images` must be a"):
            check_images("images", torch.zeros(4, 4))
        with self.assertRaisesRegex(ValueError, "`images` must hold at least 2"):
            check_images("images", torch.zeros(1, 1, 4, 4), min_count=2)
        with self.assertRaisesRegex(ValueError, "`generated` and `target` must have the same"):
            check_image_pair(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))


if __name__ == "__main__":
    unittest.main()
