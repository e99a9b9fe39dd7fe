from __future__ import annotations

import math
import unittest

import numpy as np
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.networks.schedulers import DDPMScheduler
from parameterized import parameterized

from monai_cfx.engines import (
    DiffMatchLoss,
    JointDiffusionInferer,
    JointDiffusionLoss,
    JointDiffusionPrepareBatch,
    LabelledBatchSampler,
    StrongLatentAugment,
    labelled_split,
    mark_labelled,
)
from monai_cfx.networks.nets import JointDiffusionUNet
from tests.helpers import FakeTextEncoder, tiny_autoencoder

NUM_CLASSES = 3
FAKE_CONTEXT_DIM = 4  # FakeTextEncoder's contexts are (3, 4)


def tiny_joint_unet(**kwargs) -> JointDiffusionUNet:
    """A tiny JointDiffusionUNet on the tiny autoencoder's 2-channel latents, with cross-attention to FakeTextEncoder's
    contexts (4-d: unlike its 8 channels, so a missing context cannot fall back to self-attention)."""
    torch.manual_seed(0)
    unet = JointDiffusionUNet(
        spatial_dims=2,
        in_channels=2,
        out_channels=2,
        channels=(8, 8),
        attention_levels=(False, True),
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=4,
        with_conditioning=True,
        cross_attention_dim=FAKE_CONTEXT_DIM,
        num_classes=NUM_CLASSES,
        classifier_hidden=16,
        classifier_dropout=0.0,
        **kwargs,
    )
    with torch.no_grad():  # an untrained UNet outputs zeros and ignores its context: perturb the zero weights
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.2)
    return unet


def multilabel_items(num: int = 200, seed: int = 0) -> list[dict]:
    """Items with 3 findings of prevalences ~0.4, ~0.2, ~0.05 (co-occurring) and ~45 % normals."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((num, 3)) < [0.4, 0.2, 0.05]).astype(int)
    return [{"image": f"{i}.png", "label": label.tolist()} for i, label in enumerate(labels)]


class TestLabelledSplit(unittest.TestCase):
    @parameterized.expand([[0.1], [0.25], [0.5], [1.0]])
    def test_fraction_and_stratification(self, fraction):
        items = multilabel_items()
        labelled, unlabelled = labelled_split(items, fraction, seed=3)
        self.assertEqual(sorted(labelled + unlabelled), list(range(len(items))))
        self.assertEqual(len(labelled), round(fraction * len(items)))
        positives = np.array([item["label"] for item in items]) > 0
        normal = ~positives.any(axis=1)
        for column in [*positives.T, normal]:
            share = column[labelled].sum() / column.sum()
            self.assertGreaterEqual(column[labelled].sum(), 1)  # every finding keeps a labelled positive
            self.assertAlmostEqual(share, fraction, delta=max(0.05, 1.5 / column.sum()))

    def test_rare_finding_is_kept(self):
        # one positive of finding 2 among 50: 10 % labels it anyway
        labels = [[1, 0, 0]] * 25 + [[0, 1, 0]] * 24 + [[0, 0, 1]]
        labelled, _ = labelled_split(labels, 0.1, seed=0)
        self.assertIn(49, labelled)
        self.assertEqual(len(labelled), 5)

    def test_determinism(self):
        items = multilabel_items()
        self.assertEqual(labelled_split(items, 0.2, seed=1), labelled_split(items, 0.2, seed=1))
        self.assertNotEqual(labelled_split(items, 0.2, seed=1), labelled_split(items, 0.2, seed=2))

    @parameterized.expand([[0.0], [-0.1], [1.5], [float("nan")], [True]])
    def test_bad_fraction(self, fraction):
        with self.assertRaisesRegex(ValueError, "labelled_fraction"):
            labelled_split(multilabel_items(20), fraction)

    def test_impossible_split_names_the_finding(self):
        labels = [[1, 0, 0]] * 10 + [[0, 1, 0]] * 5 + [[0, 0, 1]] * 3  # one labelled item: the rarest gets it
        with self.assertRaisesRegex(ValueError, "labelled_fraction.*finding 'effusion'"):
            labelled_split(labels, 0.05, label_names=["opacity", "effusion", "nodule"])
        with self.assertRaisesRegex(ValueError, "finding index 1"):
            labelled_split(labels, 0.05)

    def test_inconsistent_label_length(self):
        items = [{"label": [0, 1]}, {"label": [1, 0]}, {"label": [1, 0, 0]}]
        with self.assertRaisesRegex(ValueError, "items.*item 2"):
            labelled_split(items, 0.5)

    def test_mark_labelled_hides_labels(self):
        items = multilabel_items(6)
        marked = mark_labelled(items, [0, 3])
        self.assertEqual([m["labelled"] for m in marked], [1, 0, 0, 1, 0, 0])
        self.assertEqual(marked[0]["label"], items[0]["label"])
        self.assertTrue(all(math.isnan(v) for v in marked[1]["label"]))
        self.assertNotIn("labelled", items[0])  # copies
        with self.assertRaisesRegex(ValueError, "labelled_indices"):
            mark_labelled(items, [6])


class TestLabelledBatchSampler(unittest.TestCase):
    labelled, unlabelled = list(range(5)), list(range(5, 40))

    def test_composition(self):
        sampler = LabelledBatchSampler(self.labelled, self.unlabelled, labelled_per_batch=2, unlabelled_per_batch=6)
        batches = list(sampler)
        self.assertEqual(len(batches), len(sampler))
        self.assertEqual(len(sampler), 35 // 6)
        for batch in batches:
            self.assertEqual(sum(i in self.labelled for i in batch), 2)
            self.assertEqual(sum(i in self.unlabelled for i in batch), 6)
        unlabelled_seen = [i for batch in batches for i in batch if i >= 5]
        self.assertEqual(len(set(unlabelled_seen)), len(unlabelled_seen))  # each unlabelled index once per epoch
        labelled_seen = [i for batch in batches for i in batch if i < 5]
        self.assertEqual(sorted(labelled_seen[:5]), self.labelled)  # cycled: a full permutation first

    def test_processes_share_each_epochs_batches(self):
        whole = LabelledBatchSampler(self.labelled, self.unlabelled, 2, 6, seed=3)  # 35 // 6 = 5 batches
        shares = [LabelledBatchSampler(self.labelled, self.unlabelled, 2, 6, seed=3, num_replicas=2, rank=rank)
                  for rank in (0, 1)]  # fmt: skip
        for epoch in (0, 1):
            for sampler in (whole, *shares):
                sampler.set_epoch(epoch)
            batches, parts = list(whole), [list(share) for share in shares]
            self.assertEqual([len(share) for share in shares], [2, 2])  # as many steps in every process
            self.assertEqual(parts[0], batches[0:4:2])  # rank r: batches r, r + 2, ... of the same epoch
            self.assertEqual(parts[1], batches[1:4:2])
        with self.assertRaisesRegex(ValueError, "`rank` must be below"):
            LabelledBatchSampler(self.labelled, self.unlabelled, 2, 6, num_replicas=2, rank=2)
        with self.assertRaisesRegex(ValueError, "cannot be shared by 8 processes"):
            LabelledBatchSampler(self.labelled, self.unlabelled, 2, 6, num_replicas=8, rank=0)

    def test_determinism_and_epochs(self):
        def make():
            return LabelledBatchSampler(self.labelled, self.unlabelled, 2, 6, seed=7)

        first, second = make(), make()
        self.assertEqual(list(first), list(second))
        self.assertNotEqual(list(first), list(make()))  # the next iteration is the next epoch
        first.set_epoch(3), second.set_epoch(3)
        epoch3 = list(first)
        self.assertEqual(epoch3, list(second))
        fresh = make()
        fresh.set_epoch(0)
        self.assertNotEqual(epoch3, list(fresh))
        self.assertNotEqual(list(make()), list(LabelledBatchSampler(self.labelled, self.unlabelled, 2, 6, seed=8)))

    def test_supervised_only_and_errors(self):
        sampler = LabelledBatchSampler(self.labelled, [], labelled_per_batch=2, unlabelled_per_batch=0)
        self.assertEqual(len(sampler), 2)
        with self.assertRaisesRegex(ValueError, "labelled_per_batch"):
            LabelledBatchSampler(self.labelled, self.unlabelled, 0, 6)
        with self.assertRaisesRegex(ValueError, "unlabelled_per_batch"):
            LabelledBatchSampler(self.labelled, self.unlabelled[:3], 2, 6)
        with self.assertRaisesRegex(ValueError, "both"):
            LabelledBatchSampler(self.labelled, [4, 5], 1, 1)
        with self.assertRaisesRegex(ValueError, "labelled_indices"):
            LabelledBatchSampler([], self.unlabelled, 1, 1)


def joint_dataset(num: int = 12) -> tuple[list[dict], list[int], list[int]]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([[i % 2, (i // 2) % 2, int(i % 3 == 0)] for i in range(num)], dtype=torch.float32)
    reports = ["effusion" if label[0] else "no finding" for label in labels]
    items = [
        {"image": torch.rand(1, 8, 8, generator=generator), "report": report, "label": label}
        for label, report in zip(labels, reports)
    ]
    labelled, unlabelled = labelled_split(items, 0.34, seed=0)
    return mark_labelled(items, labelled), labelled, unlabelled


def collate_rows(items: list[dict], rows: list[int]) -> dict:
    """The batch of ``items[rows]`` as the joint prepare batch takes it."""
    return {
        "image": torch.stack([items[i]["image"] for i in rows]),
        "report": [items[i]["report"] for i in rows],
        "label": torch.stack([torch.as_tensor(items[i]["label"], dtype=torch.float32) for i in rows]),
        "labelled": torch.tensor([items[i]["labelled"] for i in rows]),
    }


def forward_backward(unet, prepare, inferer, loss_function, batch, seed=0):
    """One seeded training step without the optimizer: the loss and the gradients by parameter name."""
    unet.zero_grad()
    torch.manual_seed(seed)
    prepare._generator.manual_seed(seed)
    inputs, target, args, kwargs = prepare(batch)
    loss = loss_function(inferer(inputs, unet, *args, **kwargs), target)
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


class TestJointTraining(unittest.TestCase):
    def setUp(self):
        self.autoencoder = tiny_autoencoder()
        self.unet = tiny_joint_unet()
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.items, self.labelled, self.unlabelled = joint_dataset()

    def prepare(self, **kwargs):
        return JointDiffusionPrepareBatch(self.autoencoder, FakeTextEncoder(), 1000, scale_factor=1.5, **kwargs)

    def batch(self, rows):
        return collate_rows(self.items, rows)

    def test_supervised_trainer(self):
        sampler = LabelledBatchSampler(self.labelled, self.unlabelled, labelled_per_batch=2, unlabelled_per_batch=2)
        loader = DataLoader(self.items, batch_sampler=sampler, num_workers=0)
        head_before = {n: p.detach().clone() for n, p in self.unet.head.named_parameters()}
        loss_function = JointDiffusionLoss(classification_weight=1.0)
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=1,
            train_data_loader=loader,
            network=self.unet,
            optimizer=torch.optim.Adam(self.unet.parameters(), lr=1e-3),  # the head is among them
            loss_function=loss_function,
            inferer=JointDiffusionInferer(self.scheduler),
            prepare_batch=self.prepare(),
            epoch_length=3,
        )
        terms: list[dict] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: terms.append(loss_function.terms()))
        trainer.run()
        self.assertEqual(len(terms), 3)
        for step in terms:
            self.assertEqual(set(step), {"diffusion", "classification", "total"})
            self.assertTrue(all(math.isfinite(v) for v in step.values()))
            self.assertGreater(step["classification"], 0)
        for name, parameter in self.unet.head.named_parameters():  # the head learned (reference's optimiser bug)
            self.assertFalse(torch.equal(parameter, head_before[name]), msg=name)

    def test_unlabelled_labels_give_no_gradient(self):
        prepare, inferer, loss_function = self.prepare(), JointDiffusionInferer(self.scheduler), JointDiffusionLoss()
        rows = self.labelled[:2] + self.unlabelled[:2]
        batch = self.batch(rows)
        batch["label"][2:] = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])  # labels the split hid
        loss, gradients = forward_backward(self.unet, prepare, inferer, loss_function, batch)
        batch["label"][2:] = 1.0 - batch["label"][2:]
        other_loss, other_gradients = forward_backward(self.unet, prepare, inferer, loss_function, batch)
        self.assertEqual(loss.item(), other_loss.item())
        self.assertGreater(float(gradients["head.3.weight"].abs().sum()), 0)
        for name, gradient in gradients.items():
            self.assertTrue(torch.equal(gradient, other_gradients[name]), msg=name)
        batch["label"][0] = 1.0 - batch["label"][0]  # a labelled row's label does matter
        _, labelled_changed = forward_backward(self.unet, prepare, inferer, loss_function, batch)
        self.assertFalse(torch.equal(labelled_changed["head.3.weight"], gradients["head.3.weight"]))

    def test_hidden_labels_are_nan_and_unused(self):
        batch = self.batch(self.labelled[:2] + self.unlabelled[:2])
        self.assertTrue(torch.isnan(batch["label"][2:]).all())  # mark_labelled hid them
        loss, gradients = forward_backward(self.unet, self.prepare(), JointDiffusionInferer(self.scheduler),
            JointDiffusionLoss(), batch)  # fmt: skip
        self.assertTrue(math.isfinite(loss.item()))
        self.assertTrue(all(torch.isfinite(g).all() for g in gradients.values()))

    def test_classifier_never_reads_the_report(self):
        prepare = self.prepare(condition_drop_prob=0.0)
        inferer = JointDiffusionInferer(self.scheduler)
        batch = self.batch(self.labelled[:2] + self.unlabelled[:2])
        other = dict(batch, report=["a much longer report naming every finding"] * 4)
        outputs = []
        self.unet.eval()
        for data in (batch, other):
            torch.manual_seed(0)
            inputs, _, args, kwargs = prepare(data)
            self.assertTrue((kwargs["classifier_context"] == 0).all())  # the empty prompt's (length-0) context
            with torch.no_grad():
                outputs.append(inferer(inputs, self.unet, *args, **kwargs))
        (noise_prediction, logits), (other_noise_prediction, other_logits) = outputs
        self.assertTrue(torch.equal(logits, other_logits))
        self.assertFalse(torch.allclose(noise_prediction, other_noise_prediction))  # the denoiser does read it

    def test_classifier_reads_the_clean_latent_at_t0(self):
        inferer = JointDiffusionInferer(self.scheduler)
        inputs, _, args, kwargs = self.prepare()(self.batch(self.labelled[:2] + self.unlabelled[:2]))
        self.unet.eval()
        with torch.no_grad():
            _, logits = inferer(inputs, self.unet, *args, **kwargs)
            expected = self.unet.classify(inputs, context=kwargs["classifier_context"])
        torch.testing.assert_close(logits, expected)

    def test_classify_only_skips_the_denoiser(self):
        inputs, _, args, kwargs = self.prepare()(self.batch(self.labelled[:2] + self.unlabelled[:2]))
        self.unet.eval()
        calls = []
        handle = self.unet.out.register_forward_hook(lambda *_: calls.append(1))  # the denoiser's last layer
        with torch.no_grad():
            _, logits = JointDiffusionInferer(self.scheduler)(inputs, self.unet, *args, **kwargs)
            head_only = JointDiffusionInferer(self.scheduler, classify_only=True)(inputs, self.unet, *args, **kwargs)
        handle.remove()
        self.assertTrue(torch.equal(logits, head_only))
        self.assertEqual(len(calls), 1)  # only the full inferer ran the denoiser
        with self.assertRaisesRegex(ValueError, "classify_only"):
            JointDiffusionInferer(self.scheduler, strong_augment=StrongLatentAugment(), classify_only=True)

    def test_posterior_mean_option(self):
        batch = self.batch(self.labelled[:2] + self.unlabelled[:2])
        inputs, _, _, kwargs = self.prepare(classifier_latent="mean")(batch)
        with torch.no_grad():
            z_mu, _ = self.autoencoder.encode(batch["image"])
        torch.testing.assert_close(kwargs["classifier_latent"], z_mu * 1.5)
        self.assertFalse(torch.allclose(inputs, z_mu * 1.5))  # the diffusion branch keeps the posterior sample
        with self.assertRaisesRegex(ValueError, "classifier_latent"):
            self.prepare(classifier_latent="mode")

    def test_bad_batches(self):
        batch = self.batch(self.labelled[:2])
        with self.assertRaisesRegex(ValueError, "'labelled'"):
            self.prepare()({k: v for k, v in batch.items() if k != "labelled"})
        inputs, target, _, _ = self.prepare(labelled_key=None)({k: v for k, v in batch.items() if k != "labelled"})
        self.assertTrue(target["labelled"].all())
        with self.assertRaisesRegex(ValueError, r"\[0, 1\]"):
            self.prepare()(dict(batch, label=batch["label"] * 3))
        with self.assertRaisesRegex(ValueError, "'label'"):
            self.prepare()({k: v for k, v in batch.items() if k != "label"})


class TestJointDiffusionLoss(unittest.TestCase):
    def setUp(self):
        generator = torch.Generator().manual_seed(0)
        self.noise_prediction = torch.randn(4, 2, 4, 4, generator=generator, requires_grad=True)
        self.logits = torch.randn(4, NUM_CLASSES, generator=generator, requires_grad=True)
        self.target = {
            "diffusion": torch.randn(4, 2, 4, 4, generator=generator),
            "label": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [float("nan")] * 3, [float("nan")] * 3]),
            "labelled": torch.tensor([True, True, False, False]),
        }

    def test_terms(self):
        loss = JointDiffusionLoss(classification_weight=0.5, diffusion_weight=2.0)
        total = loss((self.noise_prediction, self.logits), self.target)
        mse = torch.nn.functional.mse_loss(self.noise_prediction, self.target["diffusion"])
        bce = torch.nn.functional.binary_cross_entropy_with_logits(self.logits[:2], self.target["label"][:2])
        torch.testing.assert_close(total, 2.0 * mse + 0.5 * bce)
        self.assertAlmostEqual(loss.last_terms["diffusion"], mse.item(), places=5)
        self.assertAlmostEqual(loss.last_terms["classification"], bce.item(), places=5)
        self.assertAlmostEqual(loss.last_terms["total"], total.item(), places=5)
        self.assertEqual(loss.terms(object()), loss.last_terms)

    def test_zero_weights(self):
        classifier_only = JointDiffusionLoss(classification_weight=1.0, diffusion_weight=0.0)
        classifier_only((self.noise_prediction, self.logits), self.target).backward()
        self.assertIsNone(self.noise_prediction.grad)  # the diffusion term is left out
        self.assertGreater(float(self.logits.grad.abs().sum()), 0)
        self.assertTrue((self.logits.grad[2:] == 0).all())  # unlabelled rows: no classification gradient
        self.logits.grad = None
        diffusion_only = JointDiffusionLoss(classification_weight=0.0)
        diffusion_only((self.noise_prediction, self.logits), self.target).backward()
        self.assertIsNone(self.logits.grad)
        self.assertGreater(float(diffusion_only.last_terms["classification"]), 0)  # reported all the same
        with self.assertRaisesRegex(ValueError, "both 0"):
            JointDiffusionLoss(classification_weight=0.0, diffusion_weight=0.0)
        with self.assertRaisesRegex(ValueError, "classification_weight"):
            JointDiffusionLoss(classification_weight=-1.0)

    def test_no_labelled_rows(self):
        target = dict(self.target, labelled=torch.zeros(4, dtype=torch.bool))
        loss = JointDiffusionLoss(classification_weight=1.0)
        total = loss((self.noise_prediction, self.logits), target)
        total.backward()
        self.assertTrue(math.isfinite(total.item()))
        self.assertEqual(loss.last_terms["classification"], 0.0)
        self.assertTrue((self.logits.grad == 0).all())

    def test_bad_prediction(self):
        with self.assertRaisesRegex(ValueError, "strong_augment"):
            JointDiffusionLoss(diffmatch=DiffMatchLoss())((self.noise_prediction, self.logits), self.target)
        with self.assertRaisesRegex(ValueError, "missing"):
            JointDiffusionLoss()((self.noise_prediction, self.logits), {"diffusion": self.target["diffusion"]})


class TestDiffMatch(unittest.TestCase):
    def test_confident_pseudo_labels_only(self):
        weak = torch.tensor([[5.0, -5.0, 0.5], [0.0, 4.0, -0.2]], requires_grad=True)  # p: .993 .007 .62 / .5 .98 .45
        strong = torch.zeros(2, 3, requires_grad=True)
        loss_function = DiffMatchLoss(threshold=0.95, weight=2.0)
        loss = loss_function(weak, strong)
        confident = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
        # BCE(0, y) = log 2 for any pseudo-label y; mean over all 6 entries
        self.assertAlmostEqual(loss.item(), 2.0 * math.log(2) * 3 / 6, places=5)
        self.assertAlmostEqual(loss_function.last_confident_fraction, 0.5)
        loss.backward()
        self.assertIsNone(weak.grad)  # pseudo-labels carry no gradient
        self.assertTrue(torch.equal(strong.grad != 0, confident.bool()))
        pseudo = torch.tensor([1.0, 0.0, 1.0])  # the confident entries' pseudo-labels: the signs of their weak logits
        self.assertTrue(torch.equal(torch.sign(strong.grad[confident.bool()]), torch.sign(0.5 - pseudo)))
        with self.assertRaisesRegex(ValueError, "threshold"):
            DiffMatchLoss(threshold=0.3)

    def test_joint_training_with_diffmatch(self):
        autoencoder, unet = tiny_autoencoder(), tiny_joint_unet()
        items, labelled, unlabelled = joint_dataset()
        prepare = JointDiffusionPrepareBatch(autoencoder, FakeTextEncoder(), 1000)
        augment = StrongLatentAugment(noise_std=0.3, feature_dropout=0.2, seed=0)
        inferer = JointDiffusionInferer(DDPMScheduler(1000), strong_augment=augment)
        loss_function = JointDiffusionLoss(diffmatch=DiffMatchLoss(threshold=0.51))
        rows = labelled[:2] + unlabelled[:3]
        batch = collate_rows(items, rows)
        inputs, target, args, kwargs = prepare(batch)
        prediction = inferer(inputs, unet, *args, **kwargs)
        self.assertEqual(tuple(prediction[2].shape), (3, NUM_CLASSES))  # the strong view of the unlabelled rows
        weak_logits = prediction[1]
        weak_logits.retain_grad()
        total = loss_function(prediction, target)
        self.assertEqual(set(loss_function.last_terms), {"diffusion", "classification", "diffmatch",
            "confident_fraction", "total"})  # fmt: skip
        total.backward()
        self.assertTrue(math.isfinite(total.item()))
        self.assertTrue((weak_logits.grad[2:] == 0).all())  # the weak view of unlabelled rows: no gradient
        self.assertGreater(float(unet.head[3].weight.grad.abs().sum()), 0)
        with self.assertRaisesRegex(ValueError, "labelled"):
            inferer(inputs, unet, kwargs["noise"], kwargs["timesteps"], kwargs["condition"])

    def test_one_unlabelled_row_with_a_batch_normalised_head(self):
        # the weak and strong views go through the head in one pass: a single unlabelled row is no batch of one
        autoencoder, unet = tiny_autoencoder(), tiny_joint_unet(classifier_norm="batch")
        items, labelled, unlabelled = joint_dataset()
        prepare = JointDiffusionPrepareBatch(autoencoder, FakeTextEncoder(), 1000)
        inferer = JointDiffusionInferer(DDPMScheduler(1000), strong_augment=StrongLatentAugment(seed=0))
        rows = labelled[:1] + unlabelled[:1]
        batch = collate_rows(items, rows)
        inputs, target, args, kwargs = prepare(batch)
        unet.train()
        _, weak, strong = inferer(inputs, unet, *args, **kwargs)
        self.assertEqual((tuple(weak.shape), tuple(strong.shape)), ((2, NUM_CLASSES), (1, NUM_CLASSES)))
        # the same logits as classifying the three rows together (batch statistics over all three)
        clean = inputs  # the clean latent (classifier_latent "sample", the default)
        views = torch.cat([clean, StrongLatentAugment(seed=0)(clean[1:])])
        context = kwargs["classifier_context"]
        together = unet.classify(views, context=torch.cat([context, context[1:]]))
        self.assertTrue(torch.allclose(torch.cat([weak, strong]), together, atol=1e-6))

    def test_strong_augment_is_seeded(self):
        latents = torch.randn(2, 2, 4, 4)
        first, second = StrongLatentAugment(seed=1)(latents), StrongLatentAugment(seed=1)(latents)
        self.assertTrue(torch.equal(first, second))
        self.assertFalse(torch.equal(first, latents))
        dropped = StrongLatentAugment(noise_std=0.0, feature_dropout=0.5, seed=0)(torch.ones(1000))
        self.assertAlmostEqual(float((dropped == 0).float().mean()), 0.5, delta=0.06)
        with self.assertRaisesRegex(ValueError, "feature_dropout"):
            StrongLatentAugment(feature_dropout=1.0)


if __name__ == "__main__":
    unittest.main()
