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
"""1,000 consecutive ``CrossAttentionGroundingInferer`` calls on one UNet: no hook may be left and resident memory
may grow by at most 50 MB. Every tenth call fails inside the UNet (a context of the wrong width), so the
recorder's clean-up after an error is exercised too.

A small 2D UNet keeps the loop to minutes on a CPU; the hooks and buffers are the same as with any size.
Run as ``python benchmarks/grounding_reliability.py [--calls 1000]``.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler

from monai_cfx.inferers import CrossAttentionGroundingInferer
from monai_cfx.networks import set_flash_attention


def rss_mb() -> float:
    """Current resident set size (Linux /proc), not the peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def hooks_left(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(2, 1, 1, channels=(8, 8), latent_channels=2, num_res_blocks=1, norm_num_groups=8,
        attention_levels=(False, False)).eval()  # fmt: skip
    unet = DiffusionModelUNet(2, 2, 2, channels=(16, 16), attention_levels=(True, True), num_res_blocks=1,
        norm_num_groups=8, num_head_channels=8, with_conditioning=True, cross_attention_dim=16).eval()  # fmt: skip
    set_flash_attention(unet)  # on everywhere, so that the recorder's switching off and restoring is checked
    # the window starts at step 0, so the failing calls fail while the recorder is capturing
    inferer = CrossAttentionGroundingInferer(
        DDIMScheduler(1000, clip_sample=False), 1.0, args.steps, capture_window=(0.0, 0.3), layers="all"
    )
    image, context, null = torch.rand(1, 1, 32, 32), torch.randn(1, 8, 16), torch.zeros(1, 8, 16)
    wrong_context = torch.randn(1, 8, 12)
    flash = {name: m.use_flash_attention for name, m in unet.named_modules() if hasattr(m, "use_flash_attention")}

    def call(index: int) -> None:
        if index % 10 == 9:
            try:
                inferer(image, unet, autoencoder, wrong_context, wrong_context[:, :, :12], [[1, 2]])
            except RuntimeError:
                return
            raise AssertionError("a context of the wrong width should fail inside the UNet")
        heatmaps, _ = inferer(image, unet, autoencoder, context, null, [[1, 2], [4]])
        assert heatmaps.shape == (1, 2, 32, 32)

    for index in range(20):  # warm-up: allocator pools and lazy initialisation settle
        call(index)
    gc.collect()
    start_rss, start = rss_mb(), time.perf_counter()
    for index in range(args.calls):
        call(index)
    gc.collect()
    growth = rss_mb() - start_rss
    restored = all(flash.values()) and flash == {
        name: m.use_flash_attention for name, m in unet.named_modules() if name in flash
    }
    print(f"{args.calls} calls ({args.calls // 10} failing inside the UNet) in {time.perf_counter() - start:.0f} s")
    print(f"hooks left on the UNet: {hooks_left(unet)} (goal 0); flash-attention settings restored: {restored}")
    print(f"RSS growth: {growth:+.1f} MB (goal <= 50 MB)")


if __name__ == "__main__":
    main()
