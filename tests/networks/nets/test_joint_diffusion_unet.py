from __future__ import annotations

import unittest

import torch
from monai.networks.nets import DiffusionModelUNet
from parameterized import parameterized

from monai_cfx.networks.nets import JointDiffusionUNet
from tests.helpers import CONTEXT_DIM, tiny_networks

NUM_CLASSES = 3
# the arguments of tests.helpers.tiny_networks' UNet
TINY_UNET = {
    "in_channels": 2,
    "out_channels": 2,
    "channels": (8, 8),
    "attention_levels": (False, True),
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 4,
}

CASES = [
    ["2d", 2, CONTEXT_DIM],
    ["3d", 3, CONTEXT_DIM],
    ["2d_no_context", 2, None],
    ["3d_no_context", 3, None],
]


def joint_like_tiny(spatial_dims: int, cross_attention_dim: int | None = CONTEXT_DIM, **head) -> tuple:
    """The tiny plain UNet of tests.helpers and a JointDiffusionUNet of the same architecture holding its weights."""
    _, plain = tiny_networks(spatial_dims, cross_attention_dim)
    head.setdefault("num_classes", NUM_CLASSES)
    head.setdefault("classifier_hidden", 16)
    joint = JointDiffusionUNet(
        spatial_dims=spatial_dims,
        with_conditioning=cross_attention_dim is not None,
        cross_attention_dim=cross_attention_dim,
        **TINY_UNET,
        **head,
    )
    missing = joint.load_unet_state_dict(plain.state_dict())
    return plain, joint.eval(), missing


def inputs(spatial_dims: int, with_context: bool, batch: int = 2) -> tuple:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((batch, 2) + (8,) * spatial_dims, generator=generator)
    timesteps = torch.tensor([3, 40])[:batch]
    context = torch.randn(batch, 3, CONTEXT_DIM, generator=generator) if with_context else None
    return x, timesteps, context


class TestJointDiffusionUNet(unittest.TestCase):
    @parameterized.expand(CASES)
    def test_features_equal_pooled_captures_of_monai_forward(self, _, spatial_dims, cross_attention_dim):
        _, joint, _ = joint_like_tiny(spatial_dims, cross_attention_dim)
        x, timesteps, context = inputs(spatial_dims, cross_attention_dim is not None)
        captured: list[torch.Tensor] = []

        def keep_output(module, args, output):
            captured.append(output)

        def keep_residuals(module, args, output):
            captured.extend(output[1])  # a down block returns (hidden_states, residuals)

        handles = [joint.conv_in.register_forward_hook(keep_output)]
        handles += [block.register_forward_hook(keep_residuals) for block in joint.down_blocks]
        handles.append(joint.middle_block.register_forward_hook(keep_output))
        try:
            with torch.no_grad():
                joint(x, timesteps, context)  # MONAI's own forward
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad():
            features = joint.features(x, timesteps, context)
        expected = torch.cat([c.mean(dim=tuple(range(2, c.ndim))) for c in captured], dim=1)
        self.assertEqual(tuple(features.shape), (2, joint.num_features))
        self.assertEqual(joint.num_features, 8 + 8 * 2 + 8 * 1 + 8)
        torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
        # mean_max: the same captures' averages, then their maxima over space
        _, mean_max, _ = joint_like_tiny(spatial_dims, cross_attention_dim, classifier_pooling="mean_max")
        with torch.no_grad():
            both = mean_max.features(x, timesteps, context)
        maxima = torch.cat([c.flatten(2).amax(dim=2) for c in captured], dim=1)
        self.assertEqual(mean_max.num_features, 2 * joint.num_features)
        torch.testing.assert_close(both, torch.cat([expected, maxima], dim=1), rtol=0, atol=1e-6)
        self.assertEqual(tuple(mean_max.classify(x, context=context).shape), (2, NUM_CLASSES))

    @parameterized.expand(CASES)
    def test_forward_is_monai_bit_for_bit(self, _, spatial_dims, cross_attention_dim):
        plain, joint, missing = joint_like_tiny(spatial_dims, cross_attention_dim)
        self.assertEqual(missing, ["head.0.bias", "head.0.weight", "head.3.bias", "head.3.weight"])
        x, timesteps, context = inputs(spatial_dims, cross_attention_dim is not None)
        with torch.no_grad():
            self.assertTrue(torch.equal(joint(x, timesteps, context), plain(x, timesteps, context)))

    @parameterized.expand([["2d", 2], ["3d", 3]])
    def test_classify(self, _, spatial_dims):
        _, joint, _ = joint_like_tiny(spatial_dims)
        x, _, context = inputs(spatial_dims, True)
        with torch.no_grad():
            logits = joint.classify(x)
            at_zero = joint.head(joint.features(x, torch.zeros(2, dtype=torch.long)))
            with_context = joint.classify(x, context=context)
            later = joint.classify(x, timesteps=torch.tensor([500, 500]))
        self.assertEqual(tuple(logits.shape), (2, NUM_CLASSES))
        self.assertTrue(torch.equal(logits, at_zero))  # timesteps=None is t = 0
        self.assertFalse(torch.allclose(logits, with_context))
        self.assertFalse(torch.allclose(logits, later))
        # differentiable w.r.t. the input (classifier guidance needs it)
        z = x.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(joint.classify(z).sum(), z)
        self.assertEqual(gradient.shape, x.shape)
        self.assertTrue(bool(gradient.abs().sum() > 0))

    def test_class_embeds(self):
        joint = JointDiffusionUNet(2, 2, 2, channels=(8, 8), attention_levels=(False, False), num_res_blocks=1,
                                   norm_num_groups=4, num_class_embeds=4, num_classes=2).eval()  # fmt: skip
        x = torch.randn(2, 2, 8, 8)
        with torch.no_grad():
            for parameter in joint.parameters():  # MONAI zero-initialises some layers: make the labels visible
                if not parameter.any():
                    parameter.normal_(0, 0.2)
            a = joint.classify(x, class_labels=torch.tensor([0, 0]))
            b = joint.classify(x, class_labels=torch.tensor([3, 3]))
        self.assertFalse(torch.allclose(a, b))
        with self.assertRaisesRegex(ValueError, "class_labels"):
            joint.classify(x)

    def test_joint_checkpoint_round_trip_and_wrong_head(self):
        _, joint, _ = joint_like_tiny(2)
        state = joint.state_dict()
        other = JointDiffusionUNet(spatial_dims=2, with_conditioning=True, cross_attention_dim=CONTEXT_DIM,
                                   num_classes=NUM_CLASSES, classifier_hidden=16, **TINY_UNET)  # fmt: skip
        self.assertEqual(other.load_unet_state_dict(state), [])
        other.load_state_dict(state)
        for key, value in other.state_dict().items():
            self.assertTrue(torch.equal(value, state[key]), key)

        five = JointDiffusionUNet(spatial_dims=2, with_conditioning=True, cross_attention_dim=CONTEXT_DIM,
                                  num_classes=5, classifier_hidden=16, **TINY_UNET)  # fmt: skip
        for load in (five.load_unet_state_dict, five.load_state_dict):
            with self.assertRaisesRegex(ValueError, r"num_classes=5.*'head.3.weight': \(3, 16\)"):
                load(state)

    @parameterized.expand([["2d", 2], ["3d", 3]])
    def test_batch_norm_head_standardises_each_feature(self, _, spatial_dims):
        _, joint, missing = joint_like_tiny(spatial_dims, classifier_norm="batch")
        self.assertIn("head_norm.running_mean", missing)  # a plain UNet: the head and its norm are new
        x, timesteps, context = inputs(spatial_dims, True, batch=2)
        x = torch.cat([x, x.flip(0) * 1.5 + 0.3])  # four rows
        context = torch.cat([context, context])
        zeros = torch.zeros(4, dtype=torch.long)
        with torch.no_grad():
            features = joint.features(x, zeros, context)
            joint.train()
            joint.head[2].eval()  # the norm on batch statistics, the head's dropout off to compare
            training_logits = joint.classify_features(features)
            joint.eval()
            eval_logits = joint.classify(x, context=context)
            # training: each feature standardised by the batch's own statistics (BatchNorm1d's initial affine: 1, 0)
            standardised = (features - features.mean(0)) / torch.sqrt(features.var(0, unbiased=False) + 1e-5)
            self.assertTrue(torch.allclose(training_logits, joint.head(standardised), atol=1e-5))
            # eval: the running statistics, which that training pass moved away from (0, 1)
            running_mean, running_var = joint.head_norm.running_mean, joint.head_norm.running_var
            self.assertFalse(torch.allclose(running_mean, torch.zeros_like(running_mean)))
            running = (features - running_mean) / torch.sqrt(running_var + 1e-5)
            self.assertTrue(torch.allclose(eval_logits, joint.head(running), atol=1e-5))
        self.assertEqual(tuple(eval_logits.shape), (4, NUM_CLASSES))

    def test_batch_norm_head_refuses_one_row_in_training(self):
        _, joint, _ = joint_like_tiny(2, classifier_norm="batch")
        x, _, context = inputs(2, True, batch=1)
        with self.assertRaisesRegex(ValueError, r"at least 2 rows; got a batch of 1"):
            joint.train().classify(x, context=context)
        self.assertEqual(tuple(joint.eval().classify(x, context=context).shape), (1, NUM_CLASSES))

    def test_checkpoint_of_the_other_norm_refused(self):
        _, raw, _ = joint_like_tiny(2)
        _, normed, _ = joint_like_tiny(2, classifier_norm="batch")
        for source, target, name in ((normed, raw, "None"), (raw, normed, "'batch'")):
            for load in (target.load_state_dict, target.load_unet_state_dict):
                with self.assertRaisesRegex(ValueError, rf"classifier_norm={name}"):
                    load(source.state_dict())
        # the same norm round-trips, running statistics included
        other = joint_like_tiny(2, classifier_norm="batch")[1]
        normed.head_norm.running_mean.fill_(0.25)
        other.load_state_dict(normed.state_dict())
        self.assertTrue(torch.equal(other.head_norm.running_mean, normed.head_norm.running_mean))

    def test_checkpoint_of_the_other_pooling_refused(self):
        _, mean, _ = joint_like_tiny(2)
        _, mean_max, _ = joint_like_tiny(2, classifier_pooling="mean_max")
        for source, target, name in ((mean_max, mean, "'mean'"), (mean, mean_max, "'mean_max'")):
            with self.assertRaisesRegex(ValueError, rf"classifier_pooling={name}"):
                target.load_state_dict(source.state_dict())

    def test_plain_checkpoint_with_wrong_keys_refused(self):
        plain, joint, _ = joint_like_tiny(2)
        state = plain.state_dict()
        incomplete = {k: v for k, v in state.items() if k != "conv_in.conv.weight"}
        with self.assertRaisesRegex(ValueError, r"missing UNet keys \['conv_in.conv.weight'\]"):
            joint.load_unet_state_dict(incomplete)
        with self.assertRaisesRegex(ValueError, r"unexpected keys \['extra.weight'\]"):
            joint.load_unet_state_dict({**state, "extra.weight": torch.zeros(1)})
        # a plain UNet cannot load into a JointDiffusionUNet strictly: the head is missing
        with self.assertRaises(RuntimeError):
            joint.load_state_dict(state)
        self.assertIsInstance(joint, DiffusionModelUNet)

    @parameterized.expand(
        [
            ["num_classes_zero", {"num_classes": 0}, "num_classes"],
            ["num_classes_float", {"num_classes": 2.5}, "num_classes"],
            ["num_classes_bool", {"num_classes": True}, "num_classes"],
            ["hidden", {"num_classes": 2, "classifier_hidden": 0}, "classifier_hidden"],
            ["dropout_high", {"num_classes": 2, "classifier_dropout": 1.0}, "classifier_dropout"],
            ["dropout_negative", {"num_classes": 2, "classifier_dropout": -0.1}, "classifier_dropout"],
            ["norm", {"num_classes": 2, "classifier_norm": "layer"}, "classifier_norm"],
            ["pooling", {"num_classes": 2, "classifier_pooling": "max"}, "classifier_pooling"],
        ]
    )
    def test_bad_arguments(self, _, head, name):
        with self.assertRaisesRegex(ValueError, rf"`{name}` .*got"):
            JointDiffusionUNet(spatial_dims=2, **TINY_UNET, **head)

    def test_num_classes_required(self):
        with self.assertRaises(TypeError):
            JointDiffusionUNet(spatial_dims=2, **TINY_UNET)


if __name__ == "__main__":
    unittest.main()
