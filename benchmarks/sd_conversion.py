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
"""Stable Diffusion conversion at full size: diffusers' SD 1.5 (or 2.1) UNet and VAE with random weights, saved with
``save_pretrained`` and loaded as MONAI networks; prints the largest output difference, the conversion time and the
process's peak memory.

Needs diffusers (the dev extra) and about 10 GB of memory and 4 GB of disk for the temporary folder.
``python benchmarks/sd_conversion.py [--layout sd15|sd21] [--latent_size 64]``
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch

from monai_cfx.networks.nets.stable_diffusion import load_stable_diffusion_autoencoder, load_stable_diffusion_unet

LAYOUTS = {  # the UNet configs of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1
    "sd15": {"cross_attention_dim": 768, "attention_head_dim": 8},
    "sd21": {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
             "upcast_attention": True},
}  # fmt: skip


def perturb(module: torch.nn.Module) -> None:
    """Move the zero-initialised layers off zero, so that every weight takes part in the comparison."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.copy_(0.01 * torch.randn(parameter.shape, generator=generator))


def main() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="sd15", choices=list(LAYOUTS))
    parser.add_argument("--latent_size", type=int, default=64, help="64: a 512² image")
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=args.latent_size, **LAYOUTS[args.layout]).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, sample_size=8 * args.latent_size).eval()  # fmt: skip
    perturb(unet)
    perturb(vae)
    millions = sum(p.numel() for p in unet.parameters()) / 1e6
    size = args.latent_size
    x, t = torch.randn(1, 4, size, size), torch.tensor([500])
    context = torch.randn(1, 77, LAYOUTS[args.layout]["cross_attention_dim"])
    image = torch.rand(1, 3, 8 * size, 8 * size) * 2 - 1
    with torch.no_grad():
        expected_noise = unet(x, t, encoder_hidden_states=context).sample
        posterior = vae.encode(image).latent_dist
        expected_image = vae.decode(posterior.mean).sample
    with tempfile.TemporaryDirectory() as folder:
        unet.save_pretrained(f"{folder}/unet")
        vae.save_pretrained(f"{folder}/vae")
        del unet, vae
        start = time.perf_counter()
        monai_unet = load_stable_diffusion_unet(f"{folder}/unet")
        unet_seconds = time.perf_counter() - start
        start = time.perf_counter()
        monai_vae, _ = load_stable_diffusion_autoencoder(f"{folder}/vae")
        vae_seconds = time.perf_counter() - start
    with torch.no_grad():
        noise = monai_unet(x, t, context=context)
        z_mu, _ = monai_vae.encode(image)
        decoded = monai_vae.decode(z_mu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.layout}: UNet {millions:.0f}M parameters, {size}² latent, {8 * size}² image, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"UNet: max |diff| {float((noise - expected_noise).abs().max()):.2e} (output max "
          f"{float(expected_noise.abs().max()):.2f}), conversion {unet_seconds:.1f} s")  # fmt: skip
    print(f"VAE: encoder mean max |diff| {float((z_mu - posterior.mean).abs().max()):.2e}, decoder max |diff| "
          f"{float((decoded - expected_image).abs().max()):.2e}, conversion {vae_seconds:.1f} s")  # fmt: skip
    print(f"peak memory of the process (both copies of both networks): {peak:.1f} GiB")


if __name__ == "__main__":
    main()
