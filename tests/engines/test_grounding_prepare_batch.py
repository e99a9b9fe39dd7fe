from __future__ import annotations

import unittest

import torch

from monai_cfx.engines import GroundingPrepareBatch
from tests.helpers import tiny_networks


class FakeTextEncoder:
    max_length = 6

    def __call__(self, prompts):
        return torch.stack([torch.full((6, 4), float(len(p))) for p in prompts])

    def null_context(self, batch_size):
        return torch.zeros(batch_size, 6, 4)


class TestGroundingPrepareBatch(unittest.TestCase):
    def test_arguments_of_the_inferer(self):
        autoencoder, _ = tiny_networks(2)
        tokens = torch.zeros(1, 2, 6, dtype=torch.bool)
        tokens[0, 0, [1, 2]] = True
        tokens[0, 1, 4] = True
        batch = {
            "image": torch.rand(1, 1, 8, 8),
            "prompt": ["abc"],
            "phrase_tokens": tokens,
            "phrase_mask": torch.ones(1, 2, 8, 8),
        }
        images, target, args, kwargs = GroundingPrepareBatch(autoencoder, FakeTextEncoder())(batch)
        self.assertIs(args[0], autoencoder)
        self.assertEqual(kwargs["token_indices"], [[1, 2], [4]])
        self.assertEqual(float(kwargs["conditioning"][0, 0, 0]), 3.0)
        self.assertEqual(float(kwargs["uncond_conditioning"].abs().sum()), 0.0)
        self.assertEqual(tuple(target.shape), (1, 2, 8, 8))
        source = GroundingPrepareBatch(autoencoder, FakeTextEncoder(), uncond_prompt="normal")(batch)[3]
        self.assertEqual(float(source["uncond_conditioning"][0, 0, 0]), 6.0)

    def test_images_with_different_phrases_cannot_share_a_batch(self):
        autoencoder, _ = tiny_networks(2)
        tokens = torch.zeros(2, 1, 6, dtype=torch.bool)
        tokens[0, 0, 1], tokens[1, 0, 2] = True, True
        batch = {"image": torch.rand(2, 1, 8, 8), "prompt": ["abc", "abc"], "phrase_tokens": tokens}
        with self.assertRaisesRegex(ValueError, "batch_size 1"):
            GroundingPrepareBatch(autoencoder, FakeTextEncoder())(batch)
        with self.assertRaisesRegex(ValueError, "PhraseTokensd"):
            GroundingPrepareBatch(autoencoder, FakeTextEncoder())({"image": torch.rand(1, 1, 8, 8)})


if __name__ == "__main__":
    unittest.main()
