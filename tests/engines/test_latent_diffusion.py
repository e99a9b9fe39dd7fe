from __future__ import annotations

import unittest

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from monai_cfx.engines import (
    AutoencoderKLLoss,
    LatentDiffusionPrepareBatch,
    ReconstructionPrepareBatch,
    compute_scale_factor,
    phrases_by_report,
)
from monai_cfx.inferers import DriftDiffusionInferer
from monai_cfx.transforms import EncodeLatentd
from tests.helpers import FakeTextEncoder, tiny_autoencoder


class TestAutoencoderKLLoss(unittest.TestCase):
    def test_l1_plus_weighted_kl(self):
        target = torch.zeros(2, 1, 4, 4)
        reconstruction = torch.full_like(target, 0.5)
        z_mu, z_sigma = torch.ones(2, 2, 2, 2), torch.ones(2, 2, 2, 2)
        # KL(N(1, 1) || N(0, 1)) = 0.5 per latent element, 8 elements per sample
        loss = AutoencoderKLLoss(kl_weight=0.1)((reconstruction, z_mu, z_sigma), target)
        self.assertAlmostEqual(float(loss), 0.5 + 0.1 * 4.0, places=5)
        self.assertAlmostEqual(float(AutoencoderKLLoss(0.0)((target, z_mu * 0, z_sigma), target)), 0.0)

    def test_hard_voxels_weigh_a_small_error(self):
        # one image, 100 voxels: 99 exact, one (a "lesion") off by 1
        target = torch.zeros(1, 1, 10, 10)
        reconstruction = target.clone()
        reconstruction[0, 0, 3, 4] = 1.0
        z_mu, z_sigma = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
        plain = AutoencoderKLLoss(0.0)((reconstruction, z_mu, z_sigma), target)
        # the worst 2 % of the voxels: the lesion voxel (error 1) and an exact one (0), mean 0.5
        hard = AutoencoderKLLoss(0.0, hard_fraction=0.02, hard_weight=2.0)((reconstruction, z_mu, z_sigma), target)
        self.assertAlmostEqual(float(plain), 0.01, places=6)
        self.assertAlmostEqual(float(hard), 0.01 + 2.0 * 0.5, places=6)
        # its gradient reaches the lesion voxel only, 100 times the plain L1's there
        reconstruction.requires_grad_(True)
        AutoencoderKLLoss(0.0, hard_fraction=0.01, hard_weight=1.0)((reconstruction, z_mu, z_sigma), target).backward()
        self.assertAlmostEqual(float(reconstruction.grad[0, 0, 3, 4]), 0.01 + 1.0, places=6)
        self.assertAlmostEqual(float(reconstruction.grad.abs().sum()), 0.01 + 1.0, places=6)

    def test_negative_weight(self):
        with self.assertRaisesRegex(ValueError, "kl_weight"):
            AutoencoderKLLoss(-1.0)
        with self.assertRaisesRegex(ValueError, "hard_fraction"):
            AutoencoderKLLoss(hard_fraction=0.0)
        with self.assertRaisesRegex(ValueError, "hard_weight"):
            AutoencoderKLLoss(hard_weight=float("nan"))

    def test_reconstruction_prepare_batch(self):
        images = torch.rand(2, 1, 4, 4)
        inputs, targets, args, kwargs = ReconstructionPrepareBatch()({"image": images})
        self.assertTrue(torch.equal(inputs, images) and torch.equal(targets, images))
        self.assertEqual((args, kwargs), ((), {}))


class TestLatentDiffusionPrepareBatch(unittest.TestCase):
    def setUp(self):
        self.autoencoder = tiny_autoencoder()
        self.batch = {"image": torch.rand(4, 1, 8, 8), "report": ["a", "bb", "a", "ccc"]}

    def test_outputs_and_condition_cache(self):
        text = FakeTextEncoder()
        prepare = LatentDiffusionPrepareBatch(self.autoencoder, text, 1000, scale_factor=2.0, condition_drop_prob=0.0)
        latents, target, args, kwargs = prepare(self.batch)
        self.assertEqual(tuple(latents.shape), (4, 2, 4, 4))
        self.assertTrue(torch.equal(target, kwargs["noise"]))  # epsilon prediction
        self.assertEqual(kwargs["timesteps"].shape, (4,))
        self.assertTrue(((kwargs["timesteps"] >= 0) & (kwargs["timesteps"] < 1000)).all())
        self.assertEqual([float(c[0, 0]) for c in kwargs["condition"]], [1.0, 2.0, 1.0, 3.0])
        prepare(self.batch)
        self.assertEqual(text.calls, 1)  # the second batch's prompts come from the cache

    def test_condition_dropout(self):
        prepare = LatentDiffusionPrepareBatch(self.autoencoder, FakeTextEncoder(), 1000, condition_drop_prob=1.0)
        self.assertTrue((prepare(self.batch)[3]["condition"] == 0).all())  # the empty prompt has length 0
        prepare = LatentDiffusionPrepareBatch(self.autoencoder, FakeTextEncoder(), 1000, condition_drop_prob=0.1)
        dropped = [(prepare(self.batch)[3]["condition"][:, 0, 0] == 0).float().mean() for _ in range(200)]
        self.assertAlmostEqual(float(torch.stack(dropped).mean()), 0.1, delta=0.03)

    def test_phrase_prompts_replace_reports_that_have_phrases(self):
        batch = {"image": torch.rand(4, 1, 8, 8), "report": ["a b", "ccc", "a b", "ccc"]}
        items = [
            {"report": "a b", "phrases": [{"text": "xxxx"}, {"text": "yyyyy"}]},
            {"report": "a b", "phrases": [{"text": "yyyyy"}]},
            {"report": "ccc", "phrases": []},
        ]
        phrases = phrases_by_report(items)
        self.assertEqual(phrases, {"a b": ["xxxx", "yyyyy"]})

        def lengths(prepare, calls):
            return [prepare(batch)[3]["condition"][:, 0, 0].tolist() for _ in range(calls)]

        always = LatentDiffusionPrepareBatch(
            self.autoencoder, FakeTextEncoder(), 1000, condition_drop_prob=0.0, phrase_prompts=phrases,
            phrase_prompt_prob=1.0,
        )  # fmt: skip
        seen = torch.tensor(lengths(always, 100))
        self.assertTrue((seen[:, 1::2] == 3).all())  # a report without phrases is kept
        reports = seen[:, 0::2]
        self.assertTrue(((reports == 4) | (reports == 5)).all())  # always one of its phrases
        self.assertAlmostEqual(float((reports == 4).float().mean()), 0.5, delta=0.1)  # each phrase as often
        half = LatentDiffusionPrepareBatch(
            self.autoencoder, FakeTextEncoder(), 1000, condition_drop_prob=0.0, phrase_prompts=phrases,
            phrase_prompt_prob=0.5,
        )  # fmt: skip
        kept = (torch.tensor(lengths(half, 200))[:, 0::2] == 3).float().mean()
        self.assertAlmostEqual(float(kept), 0.5, delta=0.07)
        # probability 0 draws nothing: the prompt dropout stream is that of a run without phrase prompts
        plain = LatentDiffusionPrepareBatch(self.autoencoder, FakeTextEncoder(), 1000, condition_drop_prob=0.5, seed=3)
        unused = LatentDiffusionPrepareBatch(
            self.autoencoder, FakeTextEncoder(), 1000, condition_drop_prob=0.5, seed=3, phrase_prompts=phrases
        )
        self.assertEqual(lengths(plain, 20), lengths(unused, 20))
        with self.assertRaisesRegex(ValueError, "phrase_prompt_prob"):
            LatentDiffusionPrepareBatch(self.autoencoder, FakeTextEncoder(), 1000, phrase_prompt_prob=1.5)
        with self.assertRaisesRegex(ValueError, "no report a phrase"):
            LatentDiffusionPrepareBatch(self.autoencoder, FakeTextEncoder(), 1000, phrase_prompt_prob=0.5)

    def test_v_prediction_target(self):
        scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
        prepare = LatentDiffusionPrepareBatch(
            self.autoencoder, FakeTextEncoder(), 1000, scheduler=scheduler, prediction_type="v_prediction"
        )
        latents, target, _, kwargs = prepare(self.batch)
        expected = scheduler.get_velocity(latents, kwargs["noise"], kwargs["timesteps"])
        self.assertTrue(torch.allclose(target, expected))

    def test_drift_target_matches_the_drifting_forward_pass(self):
        unet = DiffusionModelUNet(2, 2, 2, channels=(8, 8), attention_levels=(False, False), num_res_blocks=1,
            norm_num_groups=8)  # fmt: skip
        for prediction_type in ("epsilon", "v_prediction"):
            scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
            inferer = DriftDiffusionInferer(scheduler, drift=[0.1, -0.05])
            prepare = LatentDiffusionPrepareBatch(self.autoencoder, FakeTextEncoder(), 1000, drift_inferer=inferer)
            latents, target, _, kwargs = prepare(self.batch)
            drifted = kwargs["noise"] + torch.tensor([0.1, -0.05]).view(1, 2, 1, 1)
            expected = (
                drifted
                if prediction_type == "epsilon"
                else scheduler.get_velocity(latents, drifted, kwargs["timesteps"])
            )
            torch.testing.assert_close(target, expected)
            seen: list[torch.Tensor] = []
            handle = unet.register_forward_pre_hook(
                lambda _m, args, kwargs, seen=seen: seen.append(args[0] if args else kwargs["x"]), with_kwargs=True
            )
            with torch.no_grad():
                inferer(latents, unet, noise=kwargs["noise"], timesteps=kwargs["timesteps"])
            handle.remove()  # the trainer's forward pass adds δ to the same noise once
            torch.testing.assert_close(seen[0], scheduler.add_noise(latents, drifted, kwargs["timesteps"]))
        with self.assertRaisesRegex(ValueError, "drift_inferer"):
            LatentDiffusionPrepareBatch(self.autoencoder, FakeTextEncoder(), 1000, drift_inferer=object())
        with self.assertRaisesRegex(ValueError, "leave `scheduler` and `prediction_type` unset"):
            LatentDiffusionPrepareBatch(
                self.autoencoder, FakeTextEncoder(), 1000, scheduler=DDPMScheduler(1000), drift_inferer=inferer
            )

    def test_cached_posterior(self):
        # latents drawn from EncodeLatentd's cached (z_mu, z_sigma) follow the posterior that a fresh
        # encoding samples: z_mu + z_sigma * eps, eps ~ N(0, I)
        prepare = LatentDiffusionPrepareBatch(self.autoencoder, FakeTextEncoder(), 1000, scale_factor=1.5)
        items = [EncodeLatentd("image", self.autoencoder)({"image": image}) for image in self.batch["image"]]
        z_mu = torch.stack([i["image_z_mu"] for i in items])
        z_sigma = torch.stack([i["image_z_sigma"] for i in items])
        with torch.no_grad():
            fresh_mu, fresh_sigma = self.autoencoder.encode(self.batch["image"])
        self.assertTrue(torch.allclose(z_mu, fresh_mu, atol=1e-5) and torch.allclose(z_sigma, fresh_sigma, atol=1e-5))
        latents = prepare(dict(self.batch, image_z_mu=z_mu, image_z_sigma=z_sigma))[0]
        eps = (latents / 1.5 - z_mu) / z_sigma
        self.assertAlmostEqual(float(eps.mean()), 0.0, delta=0.3)
        self.assertAlmostEqual(float(eps.std()), 1.0, delta=0.3)
        exact = prepare(dict(self.batch, image_z_mu=z_mu, image_z_sigma=torch.zeros_like(z_sigma)))[0]
        self.assertTrue(torch.allclose(exact, z_mu * 1.5))

    def test_bad_input(self):
        prepare = LatentDiffusionPrepareBatch(self.autoencoder, FakeTextEncoder(), 1000)
        with self.assertRaisesRegex(ValueError, "'report'"):
            prepare({"image": self.batch["image"]})
        with self.assertRaisesRegex(ValueError, "4 images but 2 prompts"):
            prepare({"image": self.batch["image"], "report": ["a", "b"]})
        with self.assertRaisesRegex(ValueError, "prediction_type"):
            LatentDiffusionPrepareBatch(self.autoencoder, FakeTextEncoder(), 1000, prediction_type="sample")
        with self.assertRaisesRegex(ValueError, "scheduler"):
            LatentDiffusionPrepareBatch(self.autoencoder, FakeTextEncoder(), 1000, prediction_type="v_prediction")
        with self.assertRaisesRegex(ValueError, "condition_drop_prob"):
            LatentDiffusionPrepareBatch(self.autoencoder, FakeTextEncoder(), 1000, condition_drop_prob=1.5)


class TestComputeScaleFactor(unittest.TestCase):
    def test_unit_variance(self):
        autoencoder = tiny_autoencoder()
        data = [{"image": torch.rand(4, 1, 8, 8)} for _ in range(3)]
        torch.manual_seed(0)
        scale = compute_scale_factor(autoencoder, data)
        torch.manual_seed(0)
        with torch.no_grad():
            latents = torch.cat([autoencoder.encode_stage_2_inputs(d["image"]) for d in data])
        self.assertAlmostEqual(float((latents * scale).std()), 1.0, delta=0.05)

    def test_no_data(self):
        with self.assertRaisesRegex(ValueError, "no batch"):
            compute_scale_factor(tiny_autoencoder(), [])


if __name__ == "__main__":
    unittest.main()
