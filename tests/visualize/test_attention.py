from __future__ import annotations

import unittest

import torch
from monai.networks.nets import DiffusionModelUNet
from parameterized import parameterized

from monai_cfx.visualize import CrossAttentionRecorder, cross_attention_layers


def conditioned_unet(spatial_dims: int = 2, flash: bool = False) -> DiffusionModelUNet:
    torch.manual_seed(0)
    unet = DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=2,
        out_channels=2,
        channels=(8, 8, 8),
        attention_levels=(False, True, True),
        num_res_blocks=1,
        num_head_channels=4,
        norm_num_groups=4,
        with_conditioning=True,
        cross_attention_dim=6,
        use_flash_attention=flash,
    )
    with torch.no_grad():  # an untrained UNet's attention projections are zero: perturb them
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.3)
    return unet.eval()


def run(unet, spatial_dims=2, size=8, batch=2, tokens=5):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn((batch, 2) + (size,) * spatial_dims, generator=generator)
    context = torch.randn(batch, tokens, 6, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.full((batch,), 10), context=context)


class TestCrossAttentionRecorder(unittest.TestCase):
    def test_layers_and_levels(self):
        layers = cross_attention_layers(conditioned_unet())
        self.assertEqual(layers["down_blocks.1.attentions.0.transformer_blocks.0.attn2"][1], 1)
        self.assertEqual(layers["middle_block.attention.transformer_blocks.0.attn2"][1], 2)
        self.assertEqual(layers["up_blocks.0.attentions.0.transformer_blocks.0.attn2"][1], 2)
        self.assertEqual(layers["up_blocks.1.attentions.0.transformer_blocks.0.attn2"][1], 1)
        middle = CrossAttentionRecorder(conditioned_unet(), "middle").layers
        self.assertEqual({level for _, level in middle.values()}, {2})
        both = CrossAttentionRecorder(conditioned_unet(), [1, 2]).layers
        self.assertEqual(set(both), set(layers))
        self.assertEqual(
            set(CrossAttentionRecorder(conditioned_unet(), [1]).layers),
            set(CrossAttentionRecorder(conditioned_unet(), 1).layers),
        )

    @parameterized.expand([["2d", 2], ["3d", 3]])
    def test_rows_sum_to_one(self, _, spatial_dims):
        unet = conditioned_unet(spatial_dims)
        with CrossAttentionRecorder(unet, "all", normalize_each=False) as recorder:
            run(unet, spatial_dims)
        maps = recorder.maps()
        self.assertEqual(tuple(maps.shape), (2, 5) + (8,) * spatial_dims)
        torch.testing.assert_close(maps.sum(1), torch.ones_like(maps.sum(1)), atol=1e-5, rtol=1e-5)
        self.assertEqual(recorder.count, len(recorder.layers))

    def test_equals_the_blocks_own_attention_matrix(self):
        unet = conditioned_unet()
        name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
        block = cross_attention_layers(unet)[name][0]
        block.save_attn = True
        with CrossAttentionRecorder(unet, [name], token_indices=[1, 3], normalize_each=False, size=(4, 4)) as recorder:
            run(unet)
        expected = block.att_mat.mean(1)[..., [1, 3]].transpose(1, 2).reshape(2, 2, 4, 4)
        torch.testing.assert_close(recorder.maps(), expected)
        # token groups: a phrase's tokens are averaged into one map before the per-map normalisation
        with CrossAttentionRecorder(unet, [name], token_indices=[[1, 3], [2]], size=(4, 4)) as grouped:
            run(unet)
        phrase = expected.mean(1, keepdim=True).flatten(2)
        low, high = phrase.amin(2, keepdim=True), phrase.amax(2, keepdim=True)
        torch.testing.assert_close(grouped.maps()[:, :1], ((phrase - low) / (high - low)).view(2, 1, 4, 4))
        self.assertEqual(tuple(grouped.maps().shape), (2, 2, 4, 4))

    def test_token_groups_and_batch_rows(self):
        """A group's map is the mean of its tokens' maps (a repeated token counts twice); rows select as given."""
        unet = conditioned_unet()
        with CrossAttentionRecorder(unet, "all", normalize_each=False) as every:
            run(unet)
        tokens = every.maps()
        groups = [[1, 2], [3, 3, 4], [0]]
        with CrossAttentionRecorder(unet, "all", token_indices=groups, normalize_each=False) as grouped:
            run(unet)
        expected = torch.stack([tokens[:, [1, 2]].mean(1), tokens[:, [3, 3, 4]].mean(1), tokens[:, 0]], 1)
        torch.testing.assert_close(grouped.maps(), expected)
        for rows in ([1], [-1]):
            with CrossAttentionRecorder(unet, "all", token_indices=groups, batch_indices=rows) as last:
                run(unet)
            with CrossAttentionRecorder(unet, "all", token_indices=groups) as both:
                run(unet)
            torch.testing.assert_close(last.maps(), both.maps()[[1]])
        with self.assertRaises(IndexError), CrossAttentionRecorder(unet, "all", batch_indices=[1, 2]):
            run(unet)

    def test_flash_only_off_on_captured_layers_and_hooks_removed(self):
        unet = conditioned_unet(flash=True)
        reference = run(unet)
        layers = cross_attention_layers(unet)
        recorder = CrossAttentionRecorder(unet, "middle", token_indices=[0])
        with recorder:
            for name, (block, _) in layers.items():
                self.assertEqual(block.use_flash_attention, name not in recorder.layers, name)
            self.assertTrue(all(b.attn1.use_flash_attention for b in unet.modules() if hasattr(b, "attn1")))
            recorded = run(unet)
            self.assertGreater(recorder.num_hooks, 0)
        torch.testing.assert_close(recorded, reference, atol=1e-5, rtol=1e-4)  # the same network output
        self.assertEqual(recorder.num_hooks, 0)
        self.assertTrue(all(block.use_flash_attention for block, _ in layers.values()))
        self.assertFalse(any(m._forward_hooks for m in unet.modules()))
        self.assertFalse(unet._forward_pre_hooks)

    def test_hooks_removed_after_an_error(self):
        unet = conditioned_unet()
        with self.assertRaisesRegex(RuntimeError, "boom"):
            with CrossAttentionRecorder(unet):
                raise RuntimeError("boom")
        self.assertFalse(any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules()))

    def test_running_mean_and_pause(self):
        unet = conditioned_unet()
        with CrossAttentionRecorder(unet, "middle", batch_indices=[1]) as recorder:
            run(unet)
            recorder.recording = False
            run(unet, size=16)  # paused: not added
            recorder.recording = True
            run(unet)
        self.assertEqual(recorder.count, 2 * len(recorder.layers))
        self.assertEqual(recorder.maps().shape[0], 1)
        self.assertLessEqual(float(recorder.maps().max()), 1.0)

    def test_bad_input(self):
        plain = DiffusionModelUNet(
            spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8), attention_levels=(False, True),
            num_res_blocks=1, num_head_channels=4, norm_num_groups=4,
        )  # fmt: skip
        with self.assertRaisesRegex(ValueError, "no cross-attention"):
            CrossAttentionRecorder(plain)
        with self.assertRaisesRegex(ValueError, "match no cross-attention layer"):
            CrossAttentionRecorder(conditioned_unet(), ["encoder.*"])
        with self.assertRaisesRegex(ValueError, "level 0 has no cross-attention"):
            CrossAttentionRecorder(conditioned_unet(), 0)
        with self.assertRaisesRegex(ValueError, r"levels \[0\] have no cross-attention; levels with it: \[1, 2\]"):
            CrossAttentionRecorder(conditioned_unet(), [0, 1])
        with self.assertRaisesRegex(ValueError, "all levels .ints. or all name patterns"):
            CrossAttentionRecorder(conditioned_unet(), [1, "up_blocks.*"])
        with self.assertRaisesRegex(RuntimeError, "nothing was recorded"):
            CrossAttentionRecorder(conditioned_unet()).maps()


if __name__ == "__main__":
    unittest.main()
