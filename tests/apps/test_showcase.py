from __future__ import annotations

import json
import shutil
import tempfile
import unittest
from pathlib import Path

from monai.transforms import LoadImage
from PIL import Image

from monai_cfx.apps.bundle_config import default_bundle_dir
from monai_cfx.apps.showcase import main, run_showcase


class TestShowcase(unittest.TestCase):
    def test_outputs_and_no_overwrite(self):
        with tempfile.TemporaryDirectory() as out:
            summary = run_showcase(out, num_subjects=20)
            for name in ("phantoms_2d.png", "phantoms_3d.png"):
                with Image.open(Path(out, name)) as figure:
                    self.assertGreater(min(figure.size), 300)
            written = json.loads(Path(out, "summary.json").read_text())
            self.assertEqual(written["phantoms"]["chest"]["subjects"], 20)
            self.assertEqual(summary["shown_reports"]["normal"], "Normal chest radiograph.")
            volume = LoadImage(image_only=True)(str(next(Path(out, "nifti").glob("brain_*_image.nii.gz"))))
            self.assertEqual(tuple(volume.shape), (64, 64, 64))
            text = written["text_conditioning"]
            if "skipped" not in text:
                self.assertEqual(text["context_shape"][1:], [77, 384])
                for report in text["reports"]:
                    for phrase, located in report["phrases"].items():
                        # the located word pieces spell the phrase
                        self.assertEqual("".join(located["tokens"]).replace("#", ""), phrase.replace(" ", ""))
            # samples from the shipped weights, their panel and the oracle's verdicts
            metrics = json.loads(Path(out, "metrics.json").read_text())
            expected = {"2d", "3d", "counterfactuals_2d", "counterfactuals_3d", "grounding_2d", "grounding_3d"}
            expected.update({"trajectory_2d", "mediffusion_2d"})
            self.assertEqual(set(metrics), expected)
            for dims in ("2d", "3d"):
                result = metrics[dims]
                records = json.loads(Path(out, f"samples_{dims}", "prompts.json").read_text())
                self.assertEqual([r["prompt"] for r in records], [s["prompt"] for s in result["samples"]])
                agrees = [s["oracle_agrees"] for s in result["samples"]]
                self.assertAlmostEqual(result["agreement"], sum(agrees) / len(agrees))
            sample = LoadImage(image_only=True)(str(Path(out, "samples_3d", "sample_000.nii.gz")))
            self.assertEqual(tuple(sample.shape), (32, 32, 32))
            with Image.open(Path(out, "samples_2d.png")) as figure:
                self.assertGreater(min(figure.size), 300)
            # healthy counterfactuals of the abnormal chest phantoms: the oracle stops seeing the finding
            for dims in ("2d", "3d"):
                saved = json.loads(Path(out, f"counterfactuals_{dims}", "counterfactuals.json").read_text())
                examples = metrics[f"counterfactuals_{dims}"]["examples"]
                self.assertEqual(len(saved), len(examples))
                self.assertTrue(Path(out, f"counterfactuals_{dims}", saved[0]["difference"]).is_file())
            for example in metrics["counterfactuals_2d"]["examples"]:
                finding = max(example["finding_probability_before"], key=example["finding_probability_before"].get)
                self.assertLess(example["finding_probability_after"][finding], 0.5, example["title"])
                self.assertLess(example["twin_l1_inside"], example["input_twin_l1_inside"], example["title"])
            with Image.open(Path(out, "counterfactuals_2d.png")) as figure:
                self.assertGreater(min(figure.size), 300)
            # phrase heat maps of the same phantoms: saved, measured against each phrase's box, drawn
            for dims in ("2d", "3d"):
                saved = json.loads(Path(out, f"grounding_{dims}", "grounding.json").read_text())
                examples = metrics[f"grounding_{dims}"]["examples"]
                self.assertEqual([r["phrases"] for r in saved], [e["phrases"] for e in examples])
                self.assertTrue(all(a is None or 0.0 <= a <= 1.0 for e in examples for a in e["auroc"]))
                with Image.open(Path(out, f"grounding_{dims}.png")) as figure:
                    self.assertGreater(min(figure.size), 250)
            # a trajectory towards an effusion: the neutral end has none, the earliest swap and the last frame do
            trajectory = metrics["trajectory_2d"]
            self.assertLess(trajectory["frame_probability"][0], 0.5)
            self.assertGreater(trajectory["swap_probability"][-1], 0.5)
            self.assertGreater(trajectory["frame_probability"][-1], 0.5)
            saved = json.loads(Path(out, "trajectory_2d", "traversal.json").read_text())
            self.assertTrue(Path(out, "trajectory_2d", saved["trajectories"][0]["files"]["gif"]).is_file())
            with Image.open(Path(out, "trajectory_2d.png")) as figure:
                self.assertGreater(min(figure.size), 250)
            # the shipped joint network explains its own prediction: what its head saw, its guidance removed
            joint = metrics["mediffusion_2d"]
            saved = json.loads(Path(out, "mediffusion_2d", "explanations.json").read_text())
            self.assertEqual([e["removed"] for e in joint["examples"]], [r["removed"] for r in saved["items"]])
            removed = [e for e in joint["examples"] if e["removed"]]
            self.assertGreaterEqual(len(removed), 2)  # at least effusion and cardiomegaly, which the head sees
            for example in removed:
                for finding in set(example["removed"]) & set(example["finding_probability_after"]):
                    self.assertLess(example["finding_probability_after"][finding], 0.5, example["title"])
            with Image.open(Path(out, "mediffusion_2d.png")) as figure:
                self.assertGreater(min(figure.size), 300)
            # a second run refuses to replace the outputs unless asked
            self.assertEqual(main(["--output_dir", out, "--num_subjects", "5"]), 2)
            self.assertEqual(main(["--output_dir", out, "--num_subjects", "5", "--overwrite"]), 0)

    def test_bad_arguments_and_a_failed_part_write_nothing(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp, "main")
            with self.assertRaisesRegex(ValueError, "num_subjects"):
                run_showcase(out, num_subjects=0)
            with self.assertRaisesRegex(FileNotFoundError, "missing_bundle"):
                run_showcase(out, bundle_dir=Path(tmp, "missing_bundle"))
            self.assertEqual(main(["--output_dir", str(out), "--bundle_dir", str(Path(tmp, "missing_bundle"))]), 2)
            # a bundle without its weights: the first part fails, and the run leaves neither the output folder nor
            # its staging folder
            shutil.copytree(default_bundle_dir() / "configs", Path(tmp, "no_weights", "configs"))
            with self.assertRaisesRegex(Exception, "scale_factor"):
                run_showcase(out, num_subjects=5, bundle_dir=Path(tmp, "no_weights"), workers=1)
            self.assertEqual(sorted(p.name for p in Path(tmp).iterdir()), ["no_weights"])


if __name__ == "__main__":
    unittest.main()
