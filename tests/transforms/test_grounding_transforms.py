from __future__ import annotations

import tempfile
import unittest

import torch

from monai_cfx.networks.nets import TextEncoder
from monai_cfx.transforms import PhraseBoxMaskd, PhraseTokensd
from tests.helpers import save_tiny_sd_text_encoder

PROMPT = "a chest x ray with small pleural effusion in the left lung"


class TestPhraseTokensd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        save_tiny_sd_text_encoder(cls.tmp.name)
        cls.encoder = TextEncoder(cls.tmp.name, max_length=24)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_tokens_classes_and_prompt(self):
        item = {
            "report": PROMPT,
            "phrases": [{"text": "pleural effusion", "finding": "effusion"}, {"text": "left lung", "finding": "other"}],
        }
        out = PhraseTokensd(self.encoder, class_names=["opacity", "effusion"])(item)
        self.assertEqual(out["prompt"], PROMPT)
        self.assertEqual(tuple(out["phrase_tokens"].shape), (2, 24))
        for row, phrase in zip(out["phrase_tokens"], ("pleural effusion", "left lung")):
            expected = self.encoder.phrase_token_indices(PROMPT, phrase)
            self.assertEqual(row.nonzero().flatten().tolist(), expected)
        self.assertEqual(out["phrase_class"].tolist(), [1, -1])
        self.assertEqual(out["phrase_text"], "pleural effusion | left lung")
        special = set(self.encoder.tokenizer.all_special_ids)
        ids = self.encoder.tokenizer(PROMPT, padding="max_length", truncation=True, max_length=24)["input_ids"]
        self.assertFalse({ids[i] for i in out["phrase_tokens"].any(0).nonzero().flatten().tolist()} & special)

    def test_prompt_from_phrases_and_errors(self):
        out = PhraseTokensd(self.encoder)({"phrase": "small pleural effusion"})
        self.assertEqual(out["prompt"], "small pleural effusion.")
        self.assertEqual(
            int(out["phrase_tokens"].sum()),
            len(self.encoder.phrase_token_indices(out["prompt"], "small pleural effusion")),
        )
        with self.assertRaisesRegex(ValueError, "`phrase` 'right lung' does not occur"):
            PhraseTokensd(self.encoder)({"prompt": PROMPT, "phrase": "right lung"})
        long_prompt = "small pleural effusion " * 8 + "left lung"
        item = {
            "prompt": long_prompt,
            "phrases": [{"text": "left lung", "box": [0, 0, 1, 1]}, {"text": "small pleural effusion"}],
        }
        with self.assertWarnsRegex(UserWarning, "'left lung' falls .* past the truncation"):
            kept = PhraseTokensd(self.encoder)(item)
        self.assertEqual((kept["phrase_text"], len(kept["phrase_tokens"])), ("small pleural effusion", 1))
        self.assertEqual(kept["phrases"], [{"text": "small pleural effusion"}])  # PhraseBoxMaskd stays aligned
        with self.assertRaisesRegex(ValueError, "no phrase of \\['left lung'\\]"), self.assertWarns(UserWarning):
            PhraseTokensd(self.encoder)({"prompt": long_prompt, "phrase": "left lung"})
        with self.assertRaisesRegex(ValueError, "may not contain ' \\| '"):
            PhraseTokensd(self.encoder)({"prompt": PROMPT, "phrases": ["left | right"]})
        with self.assertRaisesRegex(ValueError, "none of the phrase keys"):
            PhraseTokensd(self.encoder)({"prompt": PROMPT})
        with self.assertRaisesRegex(ValueError, "non-empty text"):
            PhraseTokensd(self.encoder)({"prompt": PROMPT, "phrases": [{"finding": "effusion"}]})


class TestPhraseBoxMaskd(unittest.TestCase):
    def test_boxes_to_masks_2d_and_3d(self):
        item = {
            "image": torch.zeros(1, 8, 6),
            "phrases": [{"text": "a", "box": [1, 2, 4, 6]}, {"text": "b", "box": [0, 0, 8, 1]}],
        }
        masks = PhraseBoxMaskd()(item)["phrase_mask"]
        self.assertEqual(tuple(masks.shape), (2, 8, 6))
        self.assertEqual(float(masks[0].sum()), 3 * 4)
        self.assertEqual(float(masks[0, 1:4, 2:6].min()), 1.0)
        self.assertEqual(float(masks[1].sum()), 8)
        volume = {"image": torch.zeros(1, 4, 4, 4), "phrases": [{"text": "a", "box": [0, 1, 2, 2, 3, 4]}]}
        self.assertEqual(float(PhraseBoxMaskd()(volume)["phrase_mask"].sum()), 2 * 2 * 2)

    def test_missing_and_bad_boxes(self):
        plain = {"image": torch.zeros(1, 8, 8), "phrases": ["no box here"]}
        self.assertNotIn("phrase_mask", PhraseBoxMaskd()(plain))
        with self.assertRaisesRegex(ValueError, "inside the image"):
            PhraseBoxMaskd()({"image": torch.zeros(1, 8, 8), "phrases": [{"text": "a", "box": [0, 0, 9, 4]}]})
        mixed = {
            "image": torch.zeros(1, 8, 8),
            "phrases": [{"text": "a", "box": [0, 0, 2, 2]}, {"text": "b", "box": []}],
        }
        masks = PhraseBoxMaskd()(mixed)["phrase_mask"]
        self.assertEqual((float(masks[0].sum()), float(masks[1].sum())), (4.0, 0.0))  # b: no extent, metrics skip it
        with self.assertRaisesRegex(ValueError, "'a' needs a box"):
            PhraseBoxMaskd()({"image": torch.zeros(1, 8, 8), "phrases": [{"text": "a", "box": [0, 0, 2]}]})


if __name__ == "__main__":
    unittest.main()
