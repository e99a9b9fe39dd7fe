# Copyright (c) monai_cfx contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
from __future__ import annotations

import unittest

import torch

from monai_cfx.metrics import compute_off_manifold_fraction


class TestOffManifoldFraction(unittest.TestCase):
    def test_samples_far_from_every_reference_are_off(self):
        generator = torch.Generator().manual_seed(0)
        reference = torch.randn(400, 8, generator=generator)
        # samples of the same distribution: almost all inside; a far cluster: all outside
        same = torch.randn(100, 8, generator=generator)
        far = torch.randn(20, 8, generator=generator) + 25.0
        fraction, flags = compute_off_manifold_fraction(torch.cat([same, far]), reference)
        self.assertTrue(flags[100:].all())
        self.assertLess(float(flags[:100].float().mean()), 0.1)
        self.assertAlmostEqual(fraction, float(flags.float().mean()))
        # each reference is inside its own ball; an exact copy of the references is on the manifold
        self.assertEqual(compute_off_manifold_fraction(reference, reference)[0], 0.0)

    def test_k_sets_the_radius(self):
        reference = torch.tensor([[0.0], [1.0], [3.0], [4.0]])
        probe = torch.tensor([[5.5]])  # 1.5 from 4, whose 1st neighbour is 1 away and 2nd 3 away
        self.assertTrue(compute_off_manifold_fraction(probe, reference, k=1)[1].item())
        self.assertFalse(compute_off_manifold_fraction(probe, reference, k=2)[1].item())

    def test_refusals(self):
        reference = torch.zeros(4, 3)
        with self.assertRaisesRegex(ValueError, "same width"):
            compute_off_manifold_fraction(torch.zeros(2, 2), reference)
        with self.assertRaisesRegex(ValueError, "`k`"):
            compute_off_manifold_fraction(torch.zeros(2, 3), reference, k=4)
        with self.assertRaisesRegex(ValueError, "features"):
            compute_off_manifold_fraction(torch.zeros(3), reference)


if __name__ == "__main__":
    unittest.main()
