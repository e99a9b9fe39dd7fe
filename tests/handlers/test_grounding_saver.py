from __future__ import annotations

import json
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from monai_cfx.handlers import GroundingSaver


def item(name: str, num_phrases: int = 2) -> dict:
    affine = torch.diag(torch.tensor([0.5, 0.7, 1.0, 1.0]))
    image = MetaTensor(torch.rand(1, 12, 10), affine=affine, meta={"filename_or_obj": name})
    heatmaps = torch.rand(num_phrases, 12, 10)
    boxes = torch.zeros(num_phrases, 12, 10)
    boxes[:, 2:5, 3:6] = 1
    return {
        "image": image,
        "heatmap": heatmaps,
        "grounding_mask": (heatmaps > 0.5).float(),
        "phrase_mask": boxes,
        "prompt": "effusion and cardiomegaly",
        "phrase_text": " | ".join(["effusion", "cardiomegaly"][:num_phrases]),
    }


class TestGroundingSaver(unittest.TestCase):
    def test_files_affine_channels_stems_and_no_overwrite(self):
        with tempfile.TemporaryDirectory() as folder:
            saver = GroundingSaver(folder)
            source = item("/data/s1/cxr.nii.gz")
            first = saver.save_item(source)
            second = saver.save_item(item("/data/s2/cxr.nii.gz", num_phrases=1))
            self.assertEqual((first["heatmap"], second["heatmap"]), ("cxr_heatmap.nii.gz", "s2_cxr_heatmap.nii.gz"))
            self.assertEqual(first["phrases"], ["effusion", "cardiomegaly"])
            saved = nib.load(Path(folder, first["heatmap"]))
            np.testing.assert_allclose(saved.affine, np.diag([0.5, 0.7, 1.0, 1.0]))
            self.assertEqual(saved.shape, (12, 10, 1, 1, 2))  # channels in the 5th NIfTI dimension, phrase order kept
            for channel in range(2):
                np.testing.assert_allclose(
                    np.asarray(saved.dataobj)[:, :, 0, 0, channel], source["heatmap"][channel].numpy()
                )
            self.assertEqual(nib.load(Path(folder, second["mask"])).shape, (12, 10))  # one phrase: a plain image
            self.assertTrue(Path(folder, first["overlay"]).is_file())
            saver.write_manifest()
            self.assertEqual(len(json.loads(Path(folder, "grounding.json").read_text())), 2)
            before = Path(folder, first["heatmap"]).stat().st_mtime_ns
            with self.assertRaisesRegex(FileExistsError, "exists"):
                GroundingSaver(folder).save_item(item("/data/s1/cxr.nii.gz"))
            self.assertEqual(Path(folder, first["heatmap"]).stat().st_mtime_ns, before)
            with self.assertRaisesRegex(ValueError, "'heatmap'"):
                GroundingSaver(folder, overwrite=True).save_item({"image": item("y")["image"]})


if __name__ == "__main__":
    unittest.main()
