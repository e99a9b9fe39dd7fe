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
"""Tutorial 03: "this chest radiograph, without the effusion" -- a healthy counterfactual, its difference map,
and the reverse: an effusion induced in a healthy radiograph inside a region only.

Uses the counterfactual bundle's settings and the latent diffusion bundle's shipped weights, on a phantom
whose healthy twin is known, so the result can be checked against the truth.

Run as ``python tutorials/03_counterfactuals.py [--output_dir outputs/tutorial_03]`` (about 15 s on a CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from monai.data import MetaTensor

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.data import generate_phantom
from monai_cfx.handlers import CounterfactualSaver
from monai_cfx.metrics import compute_localization_auroc, compute_masked_l1, oracle_predict
from monai_cfx.transforms import DifferenceMap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/tutorial_03")
    parser.add_argument("--noise_strength", type=float, default=0.6)
    args = parser.parse_args()

    # 1. the bundle's inferer (DDIM inversion to noise_strength, healthy prompt, guidance) and networks
    config = load_bundle_config(
        default_bundle_dir("counterfactual"),
        ["configs/inference.json", "configs/evaluate.json"],
        device=torch.device("cpu"),
    )
    inferer = config.get_parsed_content("counterfactual_inferer")
    unet, autoencoder = config.get_parsed_content("load_diffusion"), config.get_parsed_content("load_autoencoder")
    text_encoder, oracle = config.get_parsed_content("text_encoder"), config.get_parsed_content("load_oracle")

    # 2. an abnormal phantom (64x64 like the training data) and its true healthy twin
    subject = generate_phantom(
        "chest", seed=7, size=64, findings=[{"name": "effusion", "side": "left", "size": "large"}]
    )
    image = MetaTensor(torch.from_numpy(subject["image"])[None], affine=torch.as_tensor(subject["affine"]))
    image.meta["filename_or_obj"] = "effusion.nii.gz"
    healthy, mask = torch.from_numpy(subject["healthy"])[None], torch.from_numpy(subject["mask"])[None]

    # 3. the healthy counterfactual and its difference map
    with torch.no_grad():
        healthy_prompt = text_encoder(["Normal chest radiograph."])
        empty = text_encoder.null_context(1)
    counterfactual = inferer(image, unet, autoencoder, healthy_prompt, empty, noise_strength=args.noise_strength)
    counterfactual = counterfactual.clamp(0, 1)
    difference = DifferenceMap(sigma=1.5)(image[0], counterfactual[0])[None]
    before, _ = oracle_predict(oracle, image.as_tensor())
    after, _ = oracle_predict(oracle, counterfactual.as_tensor())
    print(f"oracle p(effusion): {before[0, 1]:.2f} -> {after[0, 1]:.2f}")
    print(f"localisation AUROC of the difference map: {float(compute_localization_auroc(difference, mask)[0]):.3f}")
    input_distance = float(compute_masked_l1(image, healthy, mask, "inside")[0])
    counterfactual_distance = float(compute_masked_l1(counterfactual, healthy, mask, "inside")[0])
    print(f"L1 to the true healthy twin inside the effusion: {input_distance:.3f} -> {counterfactual_distance:.3f}")

    # 4. the reverse: induce the effusion in the healthy twin, only inside the region where it belongs
    twin = MetaTensor(healthy, affine=image.affine)
    with torch.no_grad():
        finding_prompt = text_encoder([subject["report"]])
    induced = inferer(twin, unet, autoencoder, finding_prompt, empty, region_mask=mask, noise_strength=0.6).clamp(0, 1)
    seen, _ = oracle_predict(oracle, induced.as_tensor())
    print(
        f"induced {subject['report']!r}: oracle p(effusion) {seen[0, 1]:.2f}, "
        f"leakage outside the region (L1) {float(compute_masked_l1(induced, twin, mask, 'outside')[0]):.4f}"
    )

    # 5. NIfTI files with the input's affine and a PNG panel, as the bundle writes them
    saver = CounterfactualSaver(Path(args.output_dir), default_prompt="Normal chest radiograph.", overwrite=True)
    record = saver.save_item(
        {"image": image[0], "pred": counterfactual[0], "difference": difference[0], "mask": mask[0]}
    )
    print("wrote", record["counterfactual"], record["difference"], record["panel"], "to", args.output_dir)


if __name__ == "__main__":
    main()
