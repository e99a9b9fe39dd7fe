from __future__ import annotations

import math
import unittest

import torch

from monai_cfx.metrics import GroundingMetric, compute_binned_auroc, compute_cnr, compute_miou


def box_mask(batch=1, size=8):
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, 2:5, 3:6] = 1
    return mask


class TestGroundingMetrics(unittest.TestCase):
    def test_perfect_and_inverted_heatmaps(self):
        mask = box_mask(2)
        self.assertEqual(compute_miou(mask, mask).tolist(), [1.0, 1.0])
        self.assertEqual(compute_binned_auroc(mask, mask).tolist(), [1.0, 1.0])
        self.assertEqual(compute_binned_auroc(mask, mask, num_thresholds=None).tolist(), [1.0, 1.0])
        self.assertEqual(compute_binned_auroc(1 - mask, mask, num_thresholds=None).tolist(), [0.0, 0.0])
        self.assertEqual(compute_miou(1 - mask, mask).tolist(), [0.0, 0.0])

    def test_miou_by_hand(self):
        mask = box_mask()  # 9 pixels
        heatmap = mask * 0.35  # above 0.1, 0.2, 0.3; below 0.4, 0.5
        heatmap[0, 0, 0, 0] = 0.25  # one false positive at 0.1 and 0.2
        expected = (9 / 10 + 9 / 10 + 1.0 + 0.0 + 0.0) / 5
        self.assertAlmostEqual(float(compute_miou(heatmap, mask)[0]), expected, places=6)

    def test_binned_auroc_by_hand(self):
        # 2 positives (0.9, 0.3), 2 negatives (0.6, 0.1); thresholds 0, 0.5, 1
        heatmap = torch.tensor([0.9, 0.3, 0.6, 0.1]).view(1, 1, 2, 2)
        mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
        # ROC points (fpr, tpr): t=1 -> (0, 0); t=0.5 -> (0.5, 0.5); t=0 -> (1, 1); the curve is the diagonal
        self.assertAlmostEqual(float(compute_binned_auroc(heatmap, mask, num_thresholds=3)[0]), 0.5, places=6)
        self.assertAlmostEqual(float(compute_binned_auroc(heatmap, mask, num_thresholds=None)[0]), 0.75, places=6)

    def test_cnr_by_hand(self):
        heatmap = torch.tensor([1.0, 0.8, 0.0, 0.2]).view(1, 1, 2, 2)
        mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
        self.assertAlmostEqual(float(compute_cnr(heatmap, mask)[0]), 0.8 / math.sqrt(0.02), places=4)

    def test_undefined_and_bad_input(self):
        empty = torch.zeros(1, 1, 8, 8)
        for measure in (compute_miou, compute_binned_auroc, compute_cnr):
            self.assertTrue(math.isnan(float(measure(torch.rand(1, 1, 8, 8), empty)[0])))
        with self.assertRaisesRegex(ValueError, "same"):
            compute_cnr(torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 4, 4))
        with self.assertRaisesRegex(ValueError, "num_thresholds"):
            compute_binned_auroc(box_mask(), box_mask(), num_thresholds=1)


class TestGroundingMetric(unittest.TestCase):
    def test_per_class_macro_and_all(self):
        metric = GroundingMetric(["opacity", "effusion", "nodule"])
        mask = box_mask(3)
        perfect, inverted = mask.clone(), 1 - mask
        metric(perfect[:2], mask[:2], classes=["opacity", "opacity"])
        metric(inverted[:1], mask[:1], classes=[1])
        result = metric.aggregate()
        self.assertEqual(set(result), {"opacity", "effusion", "macro", "all"})  # no nodule seen
        self.assertEqual(result["opacity"]["count"], 2)
        self.assertEqual(result["opacity"]["auroc"], 1.0)
        self.assertEqual(result["effusion"]["auroc"], 0.0)
        self.assertAlmostEqual(result["macro"]["auroc"], 0.5)  # mean of class means
        self.assertAlmostEqual(result["all"]["auroc"], 2 / 3)  # mean over boxes
        self.assertEqual(result["macro"]["count"], 2)
        metric(perfect[:1], mask[:1], classes=[-1])  # a finding of no known class: in "all" only
        result = metric.aggregate()
        self.assertAlmostEqual(result["macro"]["auroc"], 0.5)
        self.assertAlmostEqual(result["all"]["auroc"], 3 / 4)
        self.assertEqual(result["all"]["count"], 4)
        metric.reset()
        with self.assertRaisesRegex(RuntimeError, "nothing was accumulated"):
            metric.aggregate()

    def test_bad_classes(self):
        metric = GroundingMetric(["opacity"])
        with self.assertRaisesRegex(ValueError, "one finding class per heat map"):
            metric(box_mask(2), box_mask(2), classes=["opacity"])
        with self.assertRaisesRegex(ValueError, "not one of `class_names`"):
            metric(box_mask(1), box_mask(1), classes=["lesion"])
        with self.assertRaisesRegex(ValueError, "outside `class_names`"):
            metric(box_mask(1), box_mask(1), classes=[1])


class TestGroundingMetricsHandler(unittest.TestCase):
    def test_items_with_several_phrases(self):
        from types import SimpleNamespace

        from monai_cfx.handlers import GroundingMetricsHandler

        mask = box_mask(1)[0]  # (1, 8, 8)
        item = {
            "heatmap": torch.cat([mask, 1 - mask]),
            "phrase_mask": torch.cat([mask, mask]),
            "phrase_class": ["a", "b"],
        }
        engine = SimpleNamespace(state=SimpleNamespace(batch=[{}], output=[item], metrics={}))
        handler = GroundingMetricsHandler(["a", "b"])
        handler._started(engine)
        handler(engine)
        handler._completed(engine)
        self.assertEqual(engine.state.metrics["grounding"]["a"]["miou"], 1.0)
        self.assertEqual(engine.state.metrics["grounding"]["b"]["auroc"], 0.0)
        with self.assertRaisesRegex(ValueError, "phrase_class"):
            handler(SimpleNamespace(state=SimpleNamespace(batch=[{}], output=[{"heatmap": mask, "phrase_mask": mask}])))


if __name__ == "__main__":
    unittest.main()
