# Copyright (c) monai_cfx contributors
# Licensed under the Apache License, Version 2.0
"""The negative prompts of the Mediffusion edits name exactly the findings each image removes."""

from __future__ import annotations

import math
import unittest

import torch

from monai_cfx.apps.mediffusion import evaluate_targeted_removal, removal_prompts

LABELS = ["opacity", "effusion", "cardiomegaly", "nodule"]
PHRASES = {
    "opacity": "an opacity",
    "effusion": "a pleural effusion",
    "cardiomegaly": "cardiomegaly",
    "nodule": "a nodule",
}
TEMPLATE = "Chest radiograph with {findings}."
NAN = math.nan


class TestRemovalPrompts(unittest.TestCase):
    def test_names_only_the_removed_findings(self):
        target = torch.tensor([[0.0, NAN, NAN, 0.0], [NAN, NAN, 0.0, NAN], [NAN] * 4, [0.0, 0.0, 0.0, NAN]])
        self.assertEqual(
            removal_prompts(target, LABELS, PHRASES, TEMPLATE),
            [
                "Chest radiograph with an opacity and a nodule.",
                "Chest radiograph with cardiomegaly.",
                "",  # nothing removed: the empty prompt, so guidance changes nothing
                "Chest radiograph with an opacity, a pleural effusion and cardiomegaly.",
            ],
        )

    def test_induction_targets_are_not_named(self):
        # a target of 1 induces a finding: it is not pushed out
        target = torch.tensor([[1.0, 0.0, NAN, NAN]])
        self.assertEqual(
            removal_prompts(target, LABELS, PHRASES, TEMPLATE), ["Chest radiograph with a pleural effusion."]
        )

    def test_bad_arguments_are_refused(self):
        target = torch.zeros(1, 4)
        with self.assertRaisesRegex(ValueError, r"finding_phrases.*\['nodule'\]"):
            removal_prompts(target, LABELS, {k: v for k, v in PHRASES.items() if k != "nodule"}, TEMPLATE)
        with self.assertRaisesRegex(ValueError, "negative_prompt_template.*findings"):
            removal_prompts(target, LABELS, PHRASES, "Chest radiograph with abnormalities.")
        with self.assertRaisesRegex(ValueError, r"\(B, 4\).*\(1, 3\)"):
            removal_prompts(torch.zeros(1, 3), LABELS, PHRASES, TEMPLATE)


class TestTargetedRemovalInput(unittest.TestCase):
    def test_refused_before_any_edit(self):
        # no image has two findings: nothing to keep while one is removed
        data = {"image": torch.zeros(3, 1, 8, 8), "label": torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0] * 4])}
        arguments = dict(scale_factor=1.0, label_names=LABELS)
        with self.assertRaisesRegex(ValueError, "two or more findings"):
            evaluate_targeted_removal(None, None, None, None, None, data, guidance_scale=3.0, **arguments)
        with self.assertRaisesRegex(ValueError, "guidance_scale.*nan"):
            evaluate_targeted_removal(None, None, None, None, None, data, guidance_scale=NAN, **arguments)


if __name__ == "__main__":
    unittest.main()
