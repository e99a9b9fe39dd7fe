from __future__ import annotations

import os
import shutil
import tempfile
import unittest

import torch
import transformers
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointSaver
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from parameterized import parameterized

from monai_cfx.engines import (
    FineTunePrepareBatch,
    FineTuning,
    PriorPreservationLoss,
    generate_prior_latents,
    load_finetuned,
)
from monai_cfx.inferers import DriftDiffusionInferer
from monai_cfx.networks.nets import TextEncoder
from tests.helpers import HIDDEN, save_tiny_bert, tiny_autoencoder, tiny_networks

_TMP: str | None = None
BERT_DIR = ""
REPORTS = ["a chest x-ray with small pleural effusions", "no finding", "right lung", "left lung"]
TOKENS = {"full": None, "dreambooth": "x", "textual_inversion": "<target>", "custom_diffusion": "<target>"}


def setUpModule() -> None:  # noqa: N802 (unittest's name)
    global _TMP, BERT_DIR
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    _TMP = tempfile.mkdtemp()
    BERT_DIR = os.path.join(_TMP, "bert")
    save_tiny_bert(BERT_DIR)


def tearDownModule() -> None:  # noqa: N802 (unittest's name)
    shutil.rmtree(_TMP, ignore_errors=True)


def tiny_unet(with_conditioning: bool = True) -> DiffusionModelUNet:
    return tiny_networks(2, cross_attention_dim=HIDDEN if with_conditioning else None)[1]


def text_encoder() -> TextEncoder:
    return TextEncoder(BERT_DIR, max_length=16)


def train(mode: str, drift: float = 0.0, epochs: int = 2, checkpoint_dir: str | None = None):
    """A few fine-tuning iterations of ``mode`` on 4 images, as the bundle's finetune.json runs them."""
    unet, encoder, autoencoder = tiny_unet(), text_encoder(), tiny_autoencoder()
    tuning = FineTuning(mode, unet, encoder, token=TOKENS[mode], initializer="lung", drift=drift)
    scheduler = DDPMScheduler(num_train_timesteps=100)
    inferer = DriftDiffusionInferer(scheduler, drift=drift)
    prior = {}
    if mode == "dreambooth":
        latents = generate_prior_latents(unet, DDIMScheduler(100), encoder, REPORTS, (2, 4, 4), num_inference_steps=2)
        prior = {"prior_latents": latents, "prior_prompts": REPORTS}
    prepare = FineTunePrepareBatch(tuning, autoencoder, encoder, 100, drift_inferer=inferer, **prior)
    data = [{"image": torch.rand(1, 8, 8), "report": report} for report in REPORTS]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    handlers = []
    if checkpoint_dir is not None:
        handlers.append(CheckpointSaver(checkpoint_dir, {"finetuned": tuning}, save_final=True, final_filename="ft.pt"))
    trainer = SupervisedTrainer(
        "cpu",
        epochs,
        loader,
        unet,
        torch.optim.Adam(tuning.parameters(), lr=1e-2),
        PriorPreservationLoss() if mode == "dreambooth" else torch.nn.MSELoss(),
        inferer=inferer,
        prepare_batch=prepare,
        train_handlers=handlers,
    )
    trainer.run()
    return tuning, unet, encoder


class TestFineTuningModes(unittest.TestCase):
    @parameterized.expand([("full",), ("dreambooth",), ("textual_inversion",), ("custom_diffusion",)])
    def test_trains_only_what_the_mode_trains(self, mode):
        before = tiny_unet().state_dict()
        base_embedding = text_encoder().text_model.get_input_embeddings().weight.detach()
        tuning, unet, encoder = train(mode)
        changed = {name for name, tensor in unet.state_dict().items() if not torch.equal(tensor, before[name])}
        kv = {name for name in before if ".attn2.to_k." in name or ".attn2.to_v." in name}
        expected = {
            "full": set(before),
            "dreambooth": set(before),
            "textual_inversion": set(),
            "custom_diffusion": kv,
        }[mode]
        # every trained tensor moved (a few of full's biases may by chance not), and no other did
        self.assertTrue(changed <= expected, changed - expected)
        self.assertGreaterEqual(len(changed), 0.9 * len(expected))
        embedding = encoder.text_model.get_input_embeddings()
        if mode in ("textual_inversion", "custom_diffusion"):
            self.assertEqual(encoder.added_tokens, ["<target>"])
            initial = encoder.tokenizer("lung", add_special_tokens=False)["input_ids"]
            self.assertFalse(torch.allclose(embedding.added[0], base_embedding[initial].mean(0)))  # the token learned
            self.assertTrue(torch.equal(embedding.base.weight, base_embedding))
            self.assertTrue(tuning.trains_text)
        else:
            self.assertTrue(torch.equal(embedding.weight, base_embedding))
        counts = {
            "full": sum(p.numel() for p in unet.parameters()),
            "dreambooth": sum(p.numel() for p in unet.parameters()),
            "textual_inversion": HIDDEN,
            "custom_diffusion": sum(unet.get_parameter(name).numel() for name in kv) + HIDDEN,
        }
        self.assertEqual(tuning.num_trainable(), counts[mode])

    @parameterized.expand([("full", 0.0), ("textual_inversion", 0.1), ("custom_diffusion", [0.1, -0.1])])
    def test_checkpoint_restores_the_model(self, mode, drift):
        with tempfile.TemporaryDirectory() as tmp:
            tuning, unet, encoder = train(mode, drift=drift, checkpoint_dir=tmp)
            path = os.path.join(tmp, "ft.pt")
            state = torch.load(path, weights_only=True)
            fresh_unet, fresh_encoder = tiny_unet(), text_encoder()
            info = load_finetuned(path, fresh_unet, fresh_encoder)
        self.assertEqual(info, {"mode": mode, "token": TOKENS[mode], "drift": drift})
        if mode == "textual_inversion":
            self.assertEqual(state["unet"], {})  # only the token's embedding is saved
        prompts = [tuning.prompt(report) for report in REPORTS[:2]]
        context = fresh_encoder(prompts)
        self.assertTrue(torch.allclose(context, encoder(prompts).detach(), atol=1e-6))
        x, t = torch.randn(2, 2, 4, 4), torch.tensor([3, 50])
        with torch.no_grad():
            self.assertTrue(torch.allclose(fresh_unet(x, t, context), unet.eval()(x, t, context), atol=1e-6))

    def test_prompts_and_drifted_targets(self):
        unet, encoder = tiny_unet(), text_encoder()
        tuning = FineTuning("custom_diffusion", unet, encoder, token="<target>", drift=0.25)
        self.assertEqual(tuning.prompt("left lung"), "<target> left lung")
        inferer = DriftDiffusionInferer(DDPMScheduler(num_train_timesteps=100), drift=0.25)
        prepare = FineTunePrepareBatch(
            tuning, tiny_autoencoder(), encoder, 100, drift_inferer=inferer, condition_drop_prob=0.0
        )
        latents, target, _, kwargs = prepare({"image": torch.rand(2, 1, 8, 8), "report": REPORTS[:2]})
        self.assertTrue(torch.allclose(target, kwargs["noise"] + 0.25))
        expected = encoder([tuning.prompt(r) for r in REPORTS[:2]])
        self.assertTrue(torch.allclose(kwargs["condition"], expected))
        self.assertTrue(kwargs["condition"].requires_grad)  # the token's embedding learns through it

    def test_dreambooth_batches_and_loss(self):
        unet, encoder = tiny_unet(), text_encoder()
        tuning = FineTuning("dreambooth", unet, encoder, token="x")
        seen = []
        prior = torch.randn(3, 2, 4, 4)

        class Recording:
            tokenizer = encoder.tokenizer

            def __call__(self, prompts):
                seen.extend(prompts)
                return encoder(prompts)

        prepare = FineTunePrepareBatch(
            tuning,
            tiny_autoencoder(),
            Recording(),
            100,
            condition_drop_prob=0.0,
            prior_latents=prior,
            prior_prompts=["no finding", "right lung", "left lung"],
        )
        latents, target, _, kwargs = prepare({"image": torch.rand(2, 1, 8, 8), "report": REPORTS[:2]})
        self.assertEqual(latents.shape[0], 4)
        self.assertTrue(any(torch.equal(latents[2], row) for row in prior))
        # instances carry the identifier, prior samples their class prompt without it
        instance_prompts = {"x " + report for report in REPORTS[:2]}
        self.assertTrue(instance_prompts <= set(seen))
        self.assertTrue(set(seen) - instance_prompts <= {"no finding", "right lung", "left lung"})
        self.assertEqual(len(set(seen) - instance_prompts), len(set(seen)) - 2)
        loss = PriorPreservationLoss(prior_loss_weight=0.5)
        prediction = torch.zeros(4, 1)
        value = loss(prediction, torch.tensor([[1.0], [1.0], [2.0], [2.0]]))
        self.assertAlmostEqual(float(value), 1.0 + 0.5 * 4.0)
        with self.assertRaisesRegex(ValueError, "even size"):
            loss(torch.zeros(3, 1), torch.zeros(3, 1))

    def test_prior_latents(self):
        unet, encoder = tiny_unet(), text_encoder()
        unet.train()
        first = generate_prior_latents(unet, DDIMScheduler(100), encoder, REPORTS[:3], (2, 4, 4), seed=5,
                                       num_inference_steps=3, batch_size=2, verbose=False)  # fmt: skip
        again = generate_prior_latents(unet, DDIMScheduler(100), encoder, REPORTS[:3], (2, 4, 4), seed=5,
                                       num_inference_steps=3, batch_size=3, verbose=False)  # fmt: skip
        self.assertEqual(first.shape, (3, 2, 4, 4))
        self.assertTrue(torch.allclose(first, again, atol=1e-6))  # seeded per sample, whatever the batching
        self.assertTrue(unet.training)


class TestFineTuningErrors(unittest.TestCase):
    @parameterized.expand(
        [
            ("unknown_mode", "lora", None, "mode"),
            ("dreambooth_without_identifier", "dreambooth", None, "needs `token`"),
            ("textual_inversion_without_token", "textual_inversion", "  ", "needs `token`"),
            ("full_with_token", "full", "x", "does not use `token`"),
            ("token_in_vocabulary", "textual_inversion", "lung", "already in the vocabulary"),
        ]
    )
    def test_bad_arguments(self, _, mode, token, message):
        unet, encoder = tiny_unet(), text_encoder()
        with self.assertRaisesRegex(ValueError, message):
            FineTuning(mode, unet, encoder, token=token)
        # a failed set-up changes nothing: every UNet weight still trainable, no token added
        self.assertTrue(all(parameter.requires_grad for parameter in unet.parameters()))
        self.assertEqual(encoder.added_tokens, [])

    def test_drift_per_channel(self):
        with self.assertRaisesRegex(ValueError, r"`drift` must be one number or one value per latent channel \(2\)"):
            FineTuning("full", tiny_unet(), text_encoder(), drift=[0.1, 0.1, 0.1])
        with self.assertRaisesRegex(ValueError, "`drift` must be finite"):
            FineTuning("full", tiny_unet(), text_encoder(), drift=float("nan"))
        self.assertEqual(FineTuning("full", tiny_unet(), text_encoder(), drift=(0.1, 0.2)).drift.tolist(), [0.1, 0.2])

    def test_custom_diffusion_failure_keeps_the_unet(self):
        unet = tiny_unet(with_conditioning=False)
        with self.assertRaisesRegex(ValueError, "no cross-attention"):
            FineTuning("custom_diffusion", unet, text_encoder(), token="<t>")
        self.assertTrue(all(parameter.requires_grad for parameter in unet.parameters()))

    def test_recorded_drift_must_be_the_trained_one(self):
        unet, encoder = tiny_unet(), text_encoder()
        tuning = FineTuning("full", unet, encoder, drift=0.1)
        inferer = DriftDiffusionInferer(DDPMScheduler(num_train_timesteps=100), drift=0.2)
        with self.assertRaisesRegex(ValueError, "`fine_tuning.drift`"):
            FineTunePrepareBatch(tuning, tiny_autoencoder(), encoder, 100, drift_inferer=inferer)
        with self.assertRaisesRegex(ValueError, "`fine_tuning.drift`"):
            FineTunePrepareBatch(tuning, tiny_autoencoder(), encoder, 100)  # no drift_inferer: no drift trained

    def test_custom_diffusion_needs_cross_attention(self):
        with self.assertRaisesRegex(ValueError, "no cross-attention"):
            FineTuning("custom_diffusion", tiny_unet(with_conditioning=False), text_encoder(), token="<t>")

    def test_prior_latents_only_for_dreambooth(self):
        unet, encoder = tiny_unet(), text_encoder()
        with self.assertRaisesRegex(ValueError, "prior_latents"):
            FineTunePrepareBatch(FineTuning("dreambooth", unet, encoder, token="x"), tiny_autoencoder(), encoder, 100)
        with self.assertRaisesRegex(ValueError, "prior_latents"):
            FineTunePrepareBatch(
                FineTuning("full", unet, encoder), tiny_autoencoder(), encoder, 100, prior_latents=torch.zeros(1, 2)
            )
        with self.assertRaisesRegex(ValueError, "one prompt per prior latent"):
            FineTunePrepareBatch(
                FineTuning("dreambooth", unet, encoder, token="x"),
                tiny_autoencoder(),
                encoder,
                100,
                prior_latents=torch.zeros(2, 2, 4, 4),
                prior_prompts=["a"],
            )

    def test_bad_checkpoints(self):
        unet, encoder = tiny_unet(), text_encoder()
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaisesRegex(FileNotFoundError, "finetune.json"):
                load_finetuned(os.path.join(tmp, "missing.pt"), unet, encoder)
            path = os.path.join(tmp, "weights.pt")
            torch.save(unet.state_dict(), path)  # plain weights, not a fine-tuning checkpoint
            with self.assertRaisesRegex(ValueError, "not a fine-tuning checkpoint"):
                load_finetuned(path, unet, encoder)
            torch.save({"mode": "full", "token": None, "drift": 0.0, "unet": {"nope.weight": torch.zeros(1)}}, path)
            with self.assertRaisesRegex(ValueError, "lacks"):
                load_finetuned(path, unet, encoder)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "weights.pt")
            torch.save({"mode": "textual_inversion", "token": "<t>", "drift": 0.0, "unet": {}}, path)
            with self.assertRaisesRegex(ValueError, "embedding of its token"):
                load_finetuned(path, unet, encoder)
            state = tiny_networks(2, cross_attention_dim=HIDDEN)[1].state_dict()
            state["conv_in.conv.weight"] = torch.zeros(1)
            torch.save({"mode": "full", "token": None, "drift": 0.0, "unet": state}, path)
            with self.assertRaisesRegex(ValueError, "does not fit `unet`"):
                load_finetuned(path, unet, encoder)
        tuning = FineTuning("full", unet, encoder)
        with self.assertRaisesRegex(ValueError, "trained in mode 'textual_inversion'"):
            tuning.load_state_dict({"mode": "textual_inversion", "token": "<t>", "drift": 0.0, "unet": {}})


if __name__ == "__main__":
    unittest.main()
