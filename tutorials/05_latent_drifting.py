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
"""Tutorial 05: adapt the shipped latent diffusion model to a new acquisition with Textual Inversion, then sample
it with and without its new token and with a per-channel drift δ along the latent mean shift (Latent Drifting).

Uses the Latent Drifting bundle's fine-tuning config (32 target-domain chest phantoms: lower contrast, gamma,
blur, half resolution) in mode ``textual_inversion``: only one new token's embedding learns. Writes a figure of
the target images, samples of the pretrained model, samples with the learned token, and the drift's effect.
Run as ``python tutorials/05_latent_drifting.py [--steps 200] [--output_dir outputs/tutorial_05]`` (about a
minute on a CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config  # noqa: E402
from monai_cfx.apps.drifting import DriftSampler, drift_along, phantom_drift_direction  # noqa: E402
from monai_cfx.apps.generation import stack_items  # noqa: E402
from monai_cfx.inferers import DriftLatentDiffusionInferer  # noqa: E402
from monai_cfx.metrics import monte_carlo_l1  # noqa: E402
from monai_cfx.utils import save_figure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning iterations (batch 8)")
    parser.add_argument("--output_dir", default="outputs/tutorial_05")
    args = parser.parse_args()
    torch.manual_seed(0)

    # 1. the bundle's fine-tuning trainer in mode textual_inversion, without writing a checkpoint
    config = load_bundle_config(
        default_bundle_dir("latent_drifting"),
        ["configs/inference.json", "configs/finetune.json"],
        mode="textual_inversion",
        max_epochs=max(1, args.steps // 4),  # 32 images, batch 8: 4 iterations an epoch
    )
    config["train#handlers"] = []
    trainer = config.get_parsed_content("train#trainer")
    tuning = config.get_parsed_content("fine_tuning")
    print(f"mode {tuning.mode}: {tuning.num_trainable()} trainable numbers (the token {tuning.token!r})")
    trainer.run()

    # 2. sample the adapted model: the same prompts and noise with and without the token, and with a drift
    num_steps = 25
    inferer = DriftLatentDiffusionInferer(
        config.get_parsed_content("sampling_scheduler"), config.get_parsed_content("scale_factor")
    )
    autoencoder = config.get_parsed_content("autoencoder")
    sampler = DriftSampler(
        inferer,
        autoencoder,
        config.get_parsed_content("network").eval(),
        config.get_parsed_content("text_encoder_instance"),
        latent_shape=config.get_parsed_content("latent_shape"),
        num_inference_steps=num_steps,
    )
    train_data = config.get_parsed_content("train_data")
    # the drift: a quarter of the per-channel shift of the target latents' mean from the source latents', spread
    # over the sampling steps (it is added after every step); the bundle's drift_search.json --per_channel True
    # searches the fraction
    direction = phantom_drift_direction(
        autoencoder, "chest", stack_items(train_data, "image"), config.get_parsed_content("scale_factor"), num_steps, 64
    )
    (drift,) = drift_along(direction, [0.25])
    print("latent mean shift per channel:", [round(value * num_steps, 3) for value in direction])
    targets = train_data[:4]
    reports, target_images = [item["report"] for item in targets], stack_items(targets, "image")
    seeds = list(range(len(reports)))
    # without the token the prompts read as before: Textual Inversion leaves the pretrained model unchanged
    rows = {"target images": target_images, "pretrained": sampler.generate(reports, seeds)}
    rows["pretrained, drift"] = sampler.generate(reports, seeds, drift=drift)
    sampler.token = tuning.token
    rows[f"{tuning.token}"] = sampler.generate(reports, seeds)
    rows[f"{tuning.token}, drift"] = sampler.generate(reports, seeds, drift=drift)
    for name, images in rows.items():
        print(f"{name:>32}: L1 to the target images {monte_carlo_l1(images, target_images):.4f}")

    # 3. one row per setting, one column per report
    figure, axes = plt.subplots(len(rows), len(reports), figsize=(2.2 * len(reports), 2.3 * len(rows)))
    for row, (name, images) in enumerate(rows.items()):
        for column, image in enumerate(images):
            axes[row, column].imshow(image[0].T, cmap="gray", vmin=0, vmax=1)
            axes[row, column].set_xticks([]), axes[row, column].set_yticks([])
        axes[row, 0].set_ylabel(name, fontsize=8)
    for column, report in enumerate(reports):
        axes[0, column].set_title(report.replace("Chest radiograph with ", "")[:28], fontsize=7)
    path = save_figure(figure, Path(args.output_dir) / "latent_drifting.png", overwrite=True)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
