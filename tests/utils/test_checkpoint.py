from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import torch
from monai.networks.nets import DiffusionModelUNet

from monai_cfx.utils import load_weights
from tests.helpers import legacy_keys


def unet(attention_levels=(False, True)) -> DiffusionModelUNet:
    torch.manual_seed(0)
    return DiffusionModelUNet(2, 1, 1, channels=(8, 8), attention_levels=attention_levels, num_res_blocks=1,
        norm_num_groups=8, num_head_channels=8, with_conditioning=True, cross_attention_dim=4)  # fmt: skip


class TestLoadWeights(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.path = Path(self.tmp.name) / "unet.pt"

    def tearDown(self):
        self.tmp.cleanup()

    def test_growing_a_network_keeps_its_output(self):
        small = unet().eval()
        torch.save(small.state_dict(), self.path)
        with self.assertRaisesRegex(ValueError, "missing keys"):
            load_weights(unet((True, True)), self.path)
        grown = load_weights(unet((True, True)), self.path, strict=False).eval()
        x, t, c = torch.randn(1, 1, 8, 8), torch.tensor([3]), torch.randn(1, 2, 4)
        with torch.no_grad():  # MONAI zero-initialises the new attention's output projection
            torch.testing.assert_close(grown(x, t, c), small(x, t, c))
        torch.save(unet((True, True)).state_dict(), self.path)
        with self.assertRaisesRegex(ValueError, "unexpected keys"):  # never drops trained tensors
            load_weights(unet(), self.path, strict=False)

    def test_monai_generative_checkpoint(self):
        reference = unet().eval()
        old = legacy_keys(reference.state_dict())
        self.assertNotEqual(set(old), set(reference.state_dict()))
        torch.save(old, self.path)
        with self.assertRaisesRegex(ValueError, "does not fit"):
            load_weights(unet(), self.path)
        loaded = load_weights(DiffusionModelUNet(2, 1, 1, channels=(8, 8), attention_levels=(False, True),
            num_res_blocks=1, norm_num_groups=8, num_head_channels=8, with_conditioning=True,
            cross_attention_dim=4), self.path, legacy_keys=True)  # fmt: skip
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value)
        with self.assertRaisesRegex(ValueError, "monai-generative"):
            load_weights(unet((True, True)), self.path, legacy_keys=True)
        # a tensor missing and an unrelated one added: refused, never loaded half-way
        partial = {k: v for k, v in old.items() if k != "down_blocks.0.resnets.0.conv1.conv.weight"}
        torch.save({**partial, "head.weight": torch.zeros(2)}, self.path)
        with self.assertRaisesRegex(ValueError, r"found, unused keys \['head.weight'\]"):
            load_weights(unet(), self.path, legacy_keys=True)
        with self.assertRaisesRegex(ValueError, "load_old_state_dict"):
            load_weights(torch.nn.Linear(2, 2), self.path, legacy_keys=True)


if __name__ == "__main__":
    unittest.main()
