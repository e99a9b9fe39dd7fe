from __future__ import annotations

import unittest

import torch
from monai.data import MetaTensor, list_data_collate

from monai_cfx.engines import CounterfactualPrepareBatch
from monai_cfx.inferers import SamplingHook
from tests.helpers import FakeTextEncoder, tiny_autoencoder


class TextEncoderWithNull(FakeTextEncoder):
    def null_context(self, batch_size):
        return torch.zeros(batch_size, 3, 4)


def batch_of(names, prompts=None):
    items = []
    for index, name in enumerate(names):
        item = {"image": MetaTensor(torch.rand(1, 8, 8), meta={"filename_or_obj": name}), "label": torch.tensor([1.0])}
        if prompts is not None:
            item["prompt"] = prompts[index]
        items.append(item)
    return list_data_collate(items)


class TestCounterfactualPrepareBatch(unittest.TestCase):
    def setUp(self):
        self.prepare = CounterfactualPrepareBatch(tiny_autoencoder(), TextEncoderWithNull(), "Normal.", seed=7)

    def test_arguments_for_the_inferer(self):
        images, target, args, kwargs = self.prepare(batch_of(["a.nii.gz", "b.nii.gz"], ["With effusion.", ""]))
        self.assertEqual(tuple(images.shape), (2, 1, 8, 8))
        self.assertEqual(target.tolist(), [[1.0], [1.0]])
        self.assertIs(args[0], self.prepare.autoencoder)
        # the item's prompt, else the default; the empty prompt's context for guidance
        self.assertEqual(kwargs["conditioning"][:, 0, 0].tolist(), [len("With effusion."), len("Normal.")])
        self.assertEqual(float(kwargs["uncond_conditioning"].abs().sum()), 0.0)
        self.assertIsNone(kwargs["region_mask"])
        self.assertNotIn("hooks", kwargs)  # the inferer's own default

    def test_hooks_reach_every_call(self):
        hook = SamplingHook()
        prepare = CounterfactualPrepareBatch(tiny_autoencoder(), TextEncoderWithNull(), "Normal.", hooks=[hook])
        for names in (["a.nii.gz"], ["b.nii.gz", "c.nii.gz"]):
            self.assertEqual(prepare(batch_of(names))[3]["hooks"], [hook])

    def test_seeds_follow_the_file_not_the_batch(self):
        _, _, _, together = self.prepare(batch_of(["a.nii.gz", "b.nii.gz"]))
        _, _, _, alone = self.prepare(batch_of(["b.nii.gz"]))
        _, _, _, again = self.prepare(batch_of(["a.nii.gz", "b.nii.gz"]))
        self.assertEqual(together["seed"][1], alone["seed"][0])
        self.assertEqual(together["seed"], again["seed"])
        self.assertNotEqual(together["seed"][0], together["seed"][1])
        other = CounterfactualPrepareBatch(tiny_autoencoder(), TextEncoderWithNull(), "Normal.", seed=8)
        self.assertNotEqual(other(batch_of(["a.nii.gz"]))[3]["seed"][0], together["seed"][0])

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "prompt"):
            CounterfactualPrepareBatch(tiny_autoencoder(), TextEncoderWithNull(), "")
        with self.assertRaisesRegex(ValueError, "'image'"):
            self.prepare({"scan": torch.rand(1, 1, 8, 8)})
        prepare = CounterfactualPrepareBatch(
            tiny_autoencoder(), TextEncoderWithNull(), "Normal.", region_mask_key="roi"
        )
        with self.assertRaisesRegex(ValueError, "region_mask_key"):
            prepare(batch_of(["a.nii.gz"]))


if __name__ == "__main__":
    unittest.main()
