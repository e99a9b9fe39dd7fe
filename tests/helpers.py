"""Helpers shared by the test modules: tiny networks, a fake text encoder, tiny Hugging Face text models saved
locally, monai-generative key names, and running the bundles through MONAI's CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from transformers import BertConfig, BertModel, BertTokenizerFast, CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

__all__ = [
    "BERT_VOCAB",
    "BUNDLES",
    "CLIP_WORDS",
    "CONTEXT_DIM",
    "FakeTextEncoder",
    "HIDDEN",
    "LATENT_DIFFUSION_BUNDLE",
    "ProjectionOracle",
    "SCHEMA",
    "ShippedWeightsCase",
    "check_ok",
    "legacy_keys",
    "noise_images",
    "run_bundle",
    "save_tiny_bert",
    "save_tiny_sd_text_encoder",
    "tiny_autoencoder",
    "tiny_clip_tokenizer",
    "tiny_networks",
    "verify_metadata",
]

# ----------------------------------------------------------------------------------------------- tiny networks

CONTEXT_DIM = 8


class FakeTextEncoder:
    """Prompt -> context whose every entry is the prompt's length, and a call counter."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompts):
        self.calls += 1
        return torch.stack([torch.full((3, 4), float(len(p))) for p in prompts])


def tiny_autoencoder(spatial_dims: int = 2) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        latent_channels=2,
        num_res_blocks=1,
        attention_levels=(False, False),
        norm_num_groups=4,
    ).eval()


def tiny_networks(
    spatial_dims: int, cross_attention_dim: int | None = CONTEXT_DIM
) -> tuple[AutoencoderKL, DiffusionModelUNet]:
    """A tiny autoencoder (2 latent channels) and UNet; ``cross_attention_dim=None`` builds one without conditioning."""
    autoencoder = tiny_autoencoder(spatial_dims)  # seeds 0
    unet = DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=2,
        out_channels=2,
        channels=(8, 8),
        attention_levels=(False, True),
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=4,
        with_conditioning=cross_attention_dim is not None,
        cross_attention_dim=cross_attention_dim,
    )
    # an untrained DiffusionModelUNet outputs zeros and ignores its context (zero-initialised output
    # convolution and attention projections): perturb those so the tests can see conditioning
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.2)
    return autoencoder, unet.eval()


def legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key names monai-generative used (the model-zoo checkpoints carry them) for a MONAI core state dict."""
    renamed = {}
    for key, value in state.items():
        if "transformer_blocks" in key and ".out_proj." in key:
            key = key.replace(".out_proj.", ".to_out.0.")
        renamed[key.replace("postconv", "conv")] = value
    return renamed


# --------------------------------------------------------------------------- image sets and a stand-in oracle


class ProjectionOracle(torch.nn.Module):
    """A stand-in evaluation classifier: a fixed random projection of the voxels gives a 3-dim embedding."""

    def __init__(self, num_voxels: int, num_features: int = 3):
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.register_buffer("projection", torch.randn(num_voxels, num_features, generator=generator) / num_voxels**0.5)

    def logits_and_embedding(self, images):
        embedding = torch.tanh(images.flatten(1) @ self.projection)
        return embedding[:, :2], embedding


def noise_images(num, seed, shift=0.0, channels=1, size=8):
    """``0.5 + 0.1 * noise + shift`` with ``shift`` a number or one number per channel."""
    noise = torch.randn(num, channels, size, size, generator=torch.Generator().manual_seed(seed))
    shift = torch.as_tensor(shift, dtype=torch.float32).reshape(1, -1, 1, 1)
    return 0.5 + 0.1 * noise + shift


# ------------------------------------------------------------------------------------ tiny Hugging Face text models

HIDDEN = 32

# "pleural" is split into word pieces on purpose, to test '##' joins in phrase_token_indices
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "chest", "x", "-", "ray", "with", "pl", "##eur"]
BERT_VOCAB += ["##al", "effusion", "##s", "in", "the", "left", "right", "lung", "no", "finding", "small", ".", ","]
CLIP_WORDS = ["a", "chest", "x", "ray", "with", "pleural", "effusion", "in", "the", "left", "right", "lung", "small"]


def _clip_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary where every character is a token and each word is built by left-to-right merges."""
    vocab: dict[str, int] = {}
    for c in "abcdefghijklmnopqrstuvwxyz-.,":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if f"{current} {piece}" not in merges:
                merges.append(f"{current} {piece}")
            current += piece
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def tiny_clip_tokenizer(vocab_dir: str, hidden_size: int = HIDDEN) -> tuple[CLIPTokenizerFast, dict]:
    """A BPE tokenizer read from vocab.json + merges.txt written to ``vocab_dir``, and a tiny CLIP text config."""
    vocab, merges = _clip_vocab_and_merges(CLIP_WORDS)
    os.makedirs(vocab_dir)
    with open(os.path.join(vocab_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(vocab_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    eos = vocab["<|endoftext|>"]
    text_config = {
        "vocab_size": len(vocab),
        "hidden_size": hidden_size,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": eos,
        "pad_token_id": eos,
    }
    return CLIPTokenizerFast.from_pretrained(vocab_dir, model_max_length=77), text_config


def save_tiny_sd_text_encoder(folder: str, hidden_size: int = HIDDEN) -> CLIPTextModel:
    """Save a tiny CLIP text model and BPE tokenizer in a diffusers Stable Diffusion layout (tokenizer/ and
    text_encoder/), as a local copy of a real Stable Diffusion folder would hold them."""
    torch.manual_seed(0)
    tokenizer, text_config = tiny_clip_tokenizer(os.path.join(folder, "vocab"), hidden_size)
    model = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
    model.save_pretrained(os.path.join(folder, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    return model


def save_tiny_bert(folder: str, vocab_dir: str | None = None) -> tuple[BertModel, BertTokenizerFast]:
    """A tiny BERT (hidden size ``HIDDEN``) with a word-piece tokenizer read from vocab.txt, saved to ``folder``."""
    torch.manual_seed(0)
    vocab_dir = vocab_dir or os.path.join(folder, "vocab")
    os.makedirs(vocab_dir)
    with open(os.path.join(vocab_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(BERT_VOCAB) + "\n")
    bert_tokenizer = BertTokenizerFast.from_pretrained(vocab_dir, model_max_length=128)
    bert = BertModel(
        BertConfig(
            vocab_size=len(BERT_VOCAB),
            hidden_size=HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=128,
        )
    ).eval()
    bert.save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    return bert, bert_tokenizer


# ---------------------------------------------------------------------------------------------------- bundles

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = REPO_ROOT / "bundles"
LATENT_DIFFUSION_BUNDLE = BUNDLES / "latent_diffusion"
SCHEMA = BUNDLES / "schemas" / "meta_schema_text_to_image_ldm.json"


def run_bundle(configs, *overrides, launcher=(), bundle=LATENT_DIFFUSION_BUNDLE) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run`` from the bundle folder (the latent diffusion one by default)."""
    config_file = configs[0] if len(configs) == 1 else str(list(configs))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [*(launcher or [sys.executable]), "-m", "monai.bundle", "run", "--config_file", config_file]
    cmd += ["--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf", *overrides]
    return subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=600)


def run_relocated(
    bundle: Path, configs, *overrides, cwd, timeout: int = 900, launcher=None
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of ``bundle``'s ``configs`` from ``cwd`` (not the bundle's folder), with
    ``--bundle_root`` and absolute config paths: how MONAI Label, MONAI Deploy and users elsewhere run a bundle.
    ``launcher`` replaces ``[python]`` (e.g. ``[python, "-m", "torch.distributed.run", ...]``)."""
    config_file = str([str(bundle / "configs" / name) for name in configs])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [*(launcher or [sys.executable]), "-m", "monai.bundle", "run", "--bundle_root", str(bundle)]
    cmd += ["--config_file", config_file]
    cmd += ["--meta_file", str(bundle / "configs" / "metadata.json"), *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def check_ok(test: unittest.TestCase, result: subprocess.CompletedProcess) -> None:
    test.assertEqual(result.returncode, 0, msg=f"{result.args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def verify_metadata(meta_file, bundle=LATENT_DIFFUSION_BUNDLE) -> subprocess.CompletedProcess:
    """``python -m monai.bundle verify_metadata`` against the bundles' schema, offline, from the bundle folder."""
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta_file)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*cmd, "--filepath", str(SCHEMA)], cwd=bundle, env=env, capture_output=True, text=True)


class TempFolderCase(unittest.TestCase):
    """A test case with a temporary folder ``tmp`` for the whole class."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)


class ShippedWeightsCase(unittest.TestCase):
    """A bundle that runs on the latent diffusion bundle's shipped weights, on phantoms of its own (in a temporary
    folder, ``num_subjects`` of them), with ``configs_3d`` merged for the 3D variant."""

    bundle: Path = LATENT_DIFFUSION_BUNDLE  # each bundle's cases set their own folder
    configs_3d: list[str] = []
    image_size, kind, num_subjects = 64, "chest", 60

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())
        # seeds from 5000 on: the shipped weights were trained on seeds below 2000, so every split here is unseen
        subjects = str(cls.num_subjects)
        cls.common = ["--dataset_dir", str(cls.tmp / "data"), "--num_subjects", subjects, "--seed", "5000"]

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def configs(self, *names):
        # every job merges on top of configs/inference.json, which holds the bundle's definitions
        names = names if names[:1] == ("inference",) else ("inference", *names)
        return [f"configs/{name}.json" for name in names] + self.configs_3d

    def run_configs(self, configs, *overrides) -> subprocess.CompletedProcess:
        """Run this case's bundle (:func:`run_bundle`)."""
        return run_bundle(configs, *overrides, bundle=self.bundle)

    def own_datalist(self, *overrides: str) -> tuple[list[dict], Path, list[str]]:
        """Run ``inference`` on one phantom (which writes the phantom dataset), then return its ``testing`` items, the
        path ``own.json`` for a user's datalist, and the overrides that run on that datalist with the phantoms'
        folder as base (``--datalist``, ``--dataset_dir``; then ``--output_dir`` ``tmp/own``)."""
        first = ["--num_items", "1", "--output_dir", str(self.tmp / "first")]
        check_ok(self, self.run_configs(self.configs("inference"), *self.common, *overrides, *first))
        data = self.tmp / "data"
        phantoms = json.loads((data / "datalist.json").read_text())["testing"]
        datalist = self.tmp / "own.json"
        return (
            phantoms,
            datalist,
            ["--datalist", str(datalist), "--dataset_dir", str(data), "--output_dir", str(self.tmp / "own")],
        )
