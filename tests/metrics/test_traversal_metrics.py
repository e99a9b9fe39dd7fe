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

import math
import unittest

import torch

from monai_cfx.metrics import (
    compute_cfrt,
    compute_identity_preservation,
    compute_latent_direction_cosine,
    compute_monotone_fraction,
)


class TestLatentDirectionCosine(unittest.TestCase):
    def test_values_and_zero_norm_guard(self):
        neutral = torch.zeros(2, 2)
        swaps = torch.tensor(
            [
                [[1.0, 0.0], [0.0, 2.0]],  # the reference directions
                [[1.0, 1.0], [0.0, -1.0]],  # 45 degrees; opposite
                [[0.0, 0.0], [3.0, 0.0]],  # no move: undefined; orthogonal
            ]
        )
        cosine = compute_latent_direction_cosine(neutral, swaps)
        torch.testing.assert_close(cosine[:2], torch.tensor([[1.0, 1.0], [math.sqrt(0.5), -1.0]]))
        self.assertTrue(math.isnan(float(cosine[2, 0])))
        self.assertAlmostEqual(float(cosine[2, 1]), 0.0)
        with self.assertRaisesRegex(ValueError, "swaps"):
            compute_latent_direction_cosine(neutral, torch.zeros(3, 2, 3))
        with self.assertRaisesRegex(ValueError, "reference_index"):
            compute_latent_direction_cosine(neutral, swaps, reference_index=3)


class TestCFRT(unittest.TestCase):
    def test_target_must_rise_more_than_every_other_attribute(self):
        frames = torch.linspace(0, 1, 10)
        rising, flat = frames, torch.zeros(10)
        trajectories = torch.stack(
            [
                torch.stack([rising, flat, 0.5 * rising], 1),  # faithful
                torch.stack([0.5 * rising, flat, rising], 1),  # an off-target attribute rises more
                torch.stack([flat, flat, flat], 1),  # nothing changes: not faithful (a tie is no rise)
                torch.stack([rising, rising, flat], 1),  # a tie with an off-target attribute
            ]
        )
        cfrt, faithful = compute_cfrt(trajectories, target=0, frame_window=(5, 10))
        self.assertEqual(faithful.tolist(), [True, False, False, False])
        self.assertAlmostEqual(cfrt, 0.25)
        # the window matters: frames before it are ignored
        late = torch.stack([torch.cat([torch.zeros(5), torch.ones(5)]), flat, flat], 1)[None]
        self.assertEqual(compute_cfrt(late, 0, frame_window=(1, 5))[0], 0.0)
        self.assertEqual(compute_cfrt(late, 0, frame_window=(5, 10))[0], 1.0)
        self.assertEqual(compute_cfrt(late, 0, frame_window=None)[0], 1.0)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "probabilities"):
            compute_cfrt(torch.zeros(4, 10), 0)
        with self.assertRaisesRegex(ValueError, "target"):
            compute_cfrt(torch.zeros(4, 10, 3), 3)
        with self.assertRaisesRegex(ValueError, "frame_window"):
            compute_cfrt(torch.zeros(4, 10, 3), 0, frame_window=(0, 10))
        with self.assertRaisesRegex(ValueError, "frame_window"):
            compute_cfrt(torch.zeros(4, 10, 3), 0, frame_window=(5, 11))


class TestMonotoneAndIdentity(unittest.TestCase):
    def test_monotone_fraction(self):
        probabilities = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.5, 0.2, 0.6, 0.59]])
        torch.testing.assert_close(compute_monotone_fraction(probabilities), torch.tensor([1.0, 0.75]))
        with self.assertRaisesRegex(ValueError, "target_probabilities"):
            compute_monotone_fraction(torch.zeros(3, 1))

    def test_identity_preservation_2d_and_3d(self):
        for shape in ((2, 1, 16, 16), (1, 1, 8, 8, 8)):
            reference = torch.rand(shape)
            frames = torch.stack([reference, (reference + 0.2).clamp(0, 1), 1 - reference])
            measures = compute_identity_preservation(frames, reference)
            self.assertEqual(tuple(measures["ssim"].shape), (3, shape[0]))
            torch.testing.assert_close(measures["ssim"][0], torch.ones(shape[0]))
            torch.testing.assert_close(measures["l1"][0], torch.zeros(shape[0]))
            self.assertTrue((measures["ssim"][2] < measures["ssim"][1]).all())
        with self.assertRaisesRegex(ValueError, "frames"):
            compute_identity_preservation(torch.zeros(3, 2, 1, 8, 8), torch.zeros(1, 1, 8, 8))


if __name__ == "__main__":
    unittest.main()
