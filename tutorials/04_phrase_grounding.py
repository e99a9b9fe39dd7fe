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
"""Tutorial 04: "where is *moderate left pleural effusion*?" -- zero-shot phrase grounding from the cross-attention
of the shipped latent diffusion model, for every phrase of a report at once, checked against the phrases' boxes.

Uses the phrase grounding bundle's settings on a phantom with two findings, so the heat maps can be scored.
Run as ``python tutorials/04_phrase_grounding.py [--output_dir outputs/tutorial_04]`` (a few seconds on a CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from monai.data import MetaTensor

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.data import generate_phantom
from monai_cfx.handlers import GroundingSaver
from monai_cfx.metrics import compute_binned_auroc, compute_cnr
from monai_cfx.transforms import PhraseBoxMaskd, PhraseTokensd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/tutorial_04")
    args = parser.parse_args()

    # 1. the bundle's inferer (DDIM inversion, cross-attention recorded in the first 20 % of it) and networks
    config = load_bundle_config(default_bundle_dir("phrase_grounding"), ["configs/inference.json"])
    inferer = config.get_parsed_content("grounding_inferer")
    unet, autoencoder = config.get_parsed_content("load_diffusion"), config.get_parsed_content("load_autoencoder")
    text_encoder = config.get_parsed_content("text_encoder")

    # 2. a phantom with two findings; its report holds one phrase per finding, each with a box
    findings = [{"name": "effusion", "side": "left", "size": "moderate"}, "cardiomegaly"]
    subject = generate_phantom("chest", seed=11, size=64, findings=findings)
    image = MetaTensor(torch.from_numpy(subject["image"]), affine=torch.as_tensor(subject["affine"]))
    image.meta["filename_or_obj"] = "two_findings.nii.gz"
    item = {"image": image, "prompt": subject["report"], "phrases": subject["phrases"]}
    item = PhraseBoxMaskd()(PhraseTokensd(text_encoder)(item))  # token positions; boxes -> masks
    print("prompt:", item["prompt"])

    # 3. every phrase's heat map from one inversion
    token_indices = [row.nonzero().flatten().tolist() for row in item["phrase_tokens"]]
    with torch.no_grad():
        context, empty = text_encoder([item["prompt"]]), text_encoder.null_context(1)
    heatmaps, masks = inferer(image[None], unet, autoencoder, context, empty, token_indices)
    truth = item["phrase_mask"][:, None]
    aurocs = compute_binned_auroc(heatmaps[0][:, None], truth, None)
    cnrs = compute_cnr(heatmaps[0][:, None], truth)
    for phrase, auroc, cnr in zip(item["phrase_text"].split(" | "), aurocs, cnrs):
        print(f"{phrase!r}: AUROC {float(auroc):.3f} against its box, CNR {float(cnr):.2f}")

    # 4. a phrase that is not in the prompt is an error that names both
    try:
        text_encoder.phrase_token_indices(item["prompt"], "pneumothorax")
    except ValueError as error:
        print("as expected:", error)

    # 5. NIfTI files with the input's affine and a PNG overlay, as the bundle writes them
    saver = GroundingSaver(Path(args.output_dir), overwrite=True)
    record = saver.save_item({**item, "heatmap": heatmaps[0], "grounding_mask": masks[0]})
    print("wrote", record["heatmap"], record["mask"], record["overlay"], "to", args.output_dir)


if __name__ == "__main__":
    main()
