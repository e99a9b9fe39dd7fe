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
"""Tutorial 07: language-guided trajectory traversal (arXiv 2503.23623) -- "a normal chest radiograph,
progressively with an effusion", from noise and from a real scan.

A prompt swap at step λ of DDIM sampling gives images between the neutral and the target prompt; a λ sweep shares
one neutral trajectory, and a Bézier curve through the swaps' final latents gives smooth frames. Starting from the
DDIM inversion of a scan under the neutral prompt, the trajectory begins at that scan.

Uses the trajectory traversal bundle's settings and the latent diffusion bundle's shipped weights.
Run as ``python tutorials/07_trajectory_traversal.py [--output_dir outputs/tutorial_07]`` (about 30 s on a CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.data import generate_phantom
from monai_cfx.inferers import seeded_noise
from monai_cfx.metrics import compute_cfrt, compute_latent_direction_cosine, oracle_predict
from monai_cfx.visualize import plot_image_strip, save_trajectory_gif


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/tutorial_07")
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12])
    args = parser.parse_args()
    output_dir = Path(args.output_dir)

    # 1. the bundle's inferers (50 DDIM steps, guidance 7.5, swaps at λ = 5, ..., 45) and the shipped networks
    config = load_bundle_config(
        default_bundle_dir("trajectory_traversal"), ["configs/inference.json"], device=torch.device("cpu")
    )
    inferer, scan_inferer = config.get_parsed_content("inferer"), config.get_parsed_content("scan_inferer")
    unet, autoencoder = config.get_parsed_content("load_diffusion"), config.get_parsed_content("load_autoencoder")
    text_encoder, oracle = config.get_parsed_content("text_encoder"), config.get_parsed_content("load_oracle")
    with torch.no_grad():
        neutral = text_encoder(["Normal chest radiograph."])
        target = text_encoder(["Chest radiograph with a moderate right pleural effusion."])
        empty = text_encoder.null_context(1)

    # 2. from noise: one shared neutral trajectory, nine swaps, fifty Bézier frames per seed
    noise = seeded_noise(config.get_parsed_content("latent_shape"), args.seeds)
    result = inferer(noise, unet, autoencoder, neutral, target, empty)
    separate = (len(result.swap_steps) + 1) * inferer.num_inference_steps
    print(f"{result.num_model_calls} guided UNet calls for the sweep (separate runs: {separate})")
    frames = inferer.decode(result.frame_latents, autoencoder).clamp(0, 1)  # (frames, seeds, 1, 64, 64)
    probabilities, _ = oracle_predict(oracle, frames.flatten(0, 1))
    probabilities = probabilities.reshape(*frames.shape[:2], -1).transpose(0, 1)  # (seeds, frames, findings)
    cfrt, faithful = compute_cfrt(probabilities, target=1)  # effusion; mean of frames 30-49 against frame 0
    cosine = compute_latent_direction_cosine(result.neutral_latent, result.swap_latents).nanmean(1)
    print(f"p(effusion) along the frames of seed {args.seeds[0]}: "
          + " ".join(f"{p:.2f}" for p in probabilities[0, ::7, 1].tolist()))  # fmt: skip
    print(f"CFRT {cfrt:.2f} (faithful: {faithful.tolist()}); latent-direction cosine from λ = 45 to 5: "
          + " ".join(f"{c:.2f}" for c in cosine.tolist()))  # fmt: skip
    for index, seed in enumerate(args.seeds):
        shown = list(range(0, frames.shape[0], 7)) + [frames.shape[0] - 1]
        plot_image_strip(frames[shown, index], [f"frame {k}" for k in shown],
                         output_dir / f"seed_{seed}_strip.png", overwrite=True)  # fmt: skip
        save_trajectory_gif(frames[:, index], output_dir / f"seed_{seed}.gif", overwrite=True)

    # 3. from a scan: a healthy phantom the model never saw, inverted under the neutral prompt
    scan = torch.as_tensor(generate_phantom("chest", 77_000, size=64, findings=[])["image"])[None]
    scan_result = scan_inferer(scan, unet, autoencoder, neutral, target, empty)
    swaps = scan_inferer.decode(scan_result.swap_latents, autoencoder).clamp(0, 1)[:, 0]  # (swaps, 1, 64, 64)
    seen, _ = oracle_predict(oracle, swaps)
    per_swap = ", ".join(f"λ={step}: {p:.2f}" for step, p in zip(scan_result.swap_steps, seen[:, 1].tolist()))
    print(f"scan: p(effusion) per swap step {per_swap}")
    plot_image_strip(torch.cat([scan, swaps]), ["scan"] + [f"λ = {step}" for step in scan_result.swap_steps],
                     output_dir / "scan_swaps.png", overwrite=True)  # fmt: skip
    print(f"figures in {output_dir}/")


if __name__ == "__main__":
    main()
