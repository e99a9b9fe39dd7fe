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
"""Accelerated paths of the counterfactual edit against the plain one, side by side in one run.

The latent diffusion bundle's shipped UNet and autoencoder run the counterfactual bundle's default edit
(``CounterfactualInferer`` from its ``inference.json``: 20 UNet evaluations per image) on the same batch:

- **plain**: the UNet as shipped (float32, contiguous, MONAI's attention);
- **channels_last**: the UNet's weights and the edit's inputs in ``torch.channels_last`` memory format;
- **flash_attention**: the same weights with MONAI's ``use_flash_attention`` switched on in every self- and
  cross-attention block (PyTorch's ``scaled_dot_product_attention``), as ``DiffusionModelUNet(use_flash_attention=
  True)`` builds them;
- **bf16 autocast**: the UNet's forward under ``torch.autocast(<device>, torch.bfloat16)``, outputs in float32 (on
  CPU too, where PyTorch runs bf16 kernels);
- **compile**: ``torch.compile`` of the UNet in place (inductor; needs a C++ compiler on CPU); its first call, which
  compiles, is timed apart.

Every path is the configs' switch (``unet_acceleration`` in the counterfactual, latent diffusion and traversal
bundles' ``inference.json``, applied by ``monai_cfx.networks.accelerate``).

For each path: the median wall time of ``--repeats`` calls after a warm-up, the ratio to plain (< 1 is faster) and
the largest absolute difference of its counterfactual to plain's (the tolerance a config switch would state).

Run as ``python benchmarks/accelerated_paths.py [--batch_size 8] [--repeats 5] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.networks import accelerate


def timed(call: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    call()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip_compile", action="store_true", help="leave out torch.compile (minutes on CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)

    config = load_bundle_config(default_bundle_dir("counterfactual"), ["configs/inference.json"], device=device)
    inferer = config.get_parsed_content("counterfactual_inferer")
    unet = config.get_parsed_content("load_diffusion").eval()
    autoencoder = config.get_parsed_content("load_autoencoder").eval()
    text_encoder = config.get_parsed_content("text_encoder")
    size = config.get_parsed_content("image_size")
    images = torch.rand((args.batch_size, 1, size, size), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        context = text_encoder([config.get_parsed_content("healthy_prompt")]).to(device)
        uncond = text_encoder.null_context(1).to(device)

    def edit(network: torch.nn.Module, inputs: torch.Tensor = images) -> Callable[[], torch.Tensor]:
        return lambda: inferer(inputs, network, autoencoder, context, uncond, seed=0)

    print(f"{args.batch_size} images of {size}x{size}, {inferer.num_unet_evaluations()} UNet evaluations each, "
          f"{device}, {torch.get_num_threads()} threads")  # fmt: skip
    plain_time, plain = timed(edit(unet), args.repeats, device)
    rows = [("plain", plain_time, 0.0, "")]
    # each path is the configs' switch (`unet_acceleration`, monai_cfx.networks.accelerate) on a copy of the UNet
    for name, switches in (
        ("channels_last", {"channels_last": True}),
        ("flash_attention", {"flash_attention": True}),
        ("bf16_autocast", {"autocast_dtype": "bfloat16"}),
    ):
        inputs = images.contiguous(memory_format=torch.channels_last) if name == "channels_last" else images
        t, out = timed(edit(accelerate(copy.deepcopy(unet), **switches), inputs), args.repeats, device)
        rows.append((name, t, float((out - plain).abs().max()), f"mean |diff| {float((out - plain).abs().mean()):.1e}"))
    try:
        if args.skip_compile:
            raise RuntimeError("--skip_compile")
        compiled = accelerate(copy.deepcopy(unet), compile=True)
        start = time.perf_counter()
        edit(compiled)()
        first = time.perf_counter() - start
        t, out = timed(edit(compiled), args.repeats, device)
        rows.append(("compile", t, float((out - plain).abs().max()), f"first call (compiles) {first:.1f} s"))
    except Exception as error:  # noqa: BLE001 - a missing toolchain is a result here, not a failure
        rows.append(("compile", float("nan"), float("nan"), f"unavailable: {type(error).__name__}: {error}"[:120]))

    print(f"{'path':<16} {'median s':>9} {'ratio':>7} {'max |diff|':>11}  note")
    for name, seconds, difference, note in rows:
        print(f"{name:<16} {seconds:9.3f} {seconds / plain_time:7.3f} {difference:11.2e}  {note}")


if __name__ == "__main__":
    main()
