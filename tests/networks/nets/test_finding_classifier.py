from __future__ import annotations

import unittest

import torch
from parameterized import parameterized

from monai_cfx.networks.nets import FindingClassifier


class TestFindingClassifier(unittest.TestCase):
    @parameterized.expand([[2, (2, 1, 64, 64), True], [2, (2, 1, 64, 64), False], [3, (2, 1, 32, 32, 32), False]])
    def test_logits_and_embedding(self, spatial_dims, shape, stem_pooling):
        net = FindingClassifier(spatial_dims, num_findings=4, stem_pooling=stem_pooling).eval()
        images = torch.rand(shape)
        with torch.no_grad():
            logits, embedding = net(images), net.embed(images)
            features = net.features(images)
            one_pass = net.logits_and_embedding(images)
        self.assertTrue(torch.allclose(one_pass[0], logits) and torch.allclose(one_pass[1], embedding))
        self.assertEqual(tuple(logits.shape), (2, 4))
        self.assertEqual(embedding.shape[0], 2)
        # the embedding is what the classification layer reads: logits = out(embedding)
        self.assertTrue(torch.allclose(net.class_layers[-1](embedding), logits, atol=1e-6))
        # without stem pooling the dense blocks work at twice the resolution
        reduction = 16 if stem_pooling else 8
        self.assertEqual(tuple(features.shape[2:]), tuple(s // reduction for s in shape[2:]))

    def test_bad_num_findings(self):
        with self.assertRaisesRegex(ValueError, "num_findings"):
            FindingClassifier(2, num_findings=0)


if __name__ == "__main__":
    unittest.main()
