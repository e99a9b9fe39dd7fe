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
"""Tutorial 06: a diffusion model that also classifies (Mediffusion) -- the joint network's head predicts the
findings of a chest radiograph, and its own classifier guidance removes them: the difference to the input explains
the prediction.

Uses the Mediffusion bundle's shipped joint network (``bundles/mediffusion/models/joint_2d_0.1.pt``, trained by its
``train.json`` with 10 % of the training labels) and its inference settings, on phantoms whose healthy twins are
known, so each explanation can be checked against the truth; an independent classifier (the latent diffusion
bundle's oracle) says whether the finding is really gone.

Run as ``python tutorials/06_joint_diffusion.py [--output_dir outputs/tutorial_06]`` (about 20 s on a CPU).
"""

from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np
import torch

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.apps.mediffusion import explain_predictions, head_probabilities
from monai_cfx.data import generate_phantom
from monai_cfx.metrics import compute_localization_auroc, compute_masked_l1, oracle_predict
from monai_cfx.transforms import DifferenceMap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/tutorial_06")
    parser.add_argument("--guidance_scale", type=float, default=None, help="default: the bundle's")
    args = parser.parse_args()

    # 1. the joint network (a MONAI DiffusionModelUNet with a classification head), its autoencoder and settings
    config = load_bundle_config(default_bundle_dir("mediffusion"), ["configs/inference.json"], device="cpu")
    get = config.get_parsed_content
    network, autoencoder, text_encoder = get("network"), get("autoencoder"), get("text_encoder")
    label_names, scale_factor = list(get("label_names")), get("scale_factor")
    guidance_scale = get("guidance_scale") if args.guidance_scale is None else args.guidance_scale
    oracle = get("latent_diffusion").get_parsed_content("load_oracle")

    # 2. one phantom per finding (64x64, as the network was trained), with its healthy twin
    subjects = [generate_phantom("chest", seed=11, size=64, findings=[name]) for name in label_names]
    images = torch.stack([torch.from_numpy(subject["image"]) for subject in subjects]).float()

    # 3. the head's prediction: classify() reads the clean latent at t = 0 under the empty prompt
    with torch.no_grad():
        empty = text_encoder.null_context(1)
    probabilities = head_probabilities(network, autoencoder, images, scale_factor, empty)
    for name, row in zip(label_names, probabilities):
        print(f"{name:>13} phantom: head " + ", ".join(f"{k} {p:.2f}" for k, p in zip(label_names, row.tolist())))

    # 4. explain: remove every predicted finding with the head's own classifier guidance on the sampling loop,
    #    written as NIfTI (the input's affine), PNG panels and explanations.json
    inputs = {"images": images, "affines": [s["affine"] for s in subjects], "names": label_names, "labels": None}
    manifest = explain_predictions(
        get("counterfactual_inferer"), network, autoencoder, text_encoder, inputs, args.output_dir,
        scale_factor=scale_factor, label_names=label_names, guidance_scale=guidance_scale, prompt=get("prompt"),
        decision_threshold=get("decision_threshold"), through_denoiser=get("through_denoiser"), overwrite=True,
    )  # fmt: skip

    # 5. check each explanation against the truth: is the finding gone for an independent classifier, does the
    #    difference map point at it, and does the rest of the image stay as it was?
    for index, (name, subject, record) in enumerate(zip(label_names, subjects, manifest["items"])):
        edited = np.asarray(nib.load(f"{args.output_dir}/{record['files']['counterfactual']}").dataobj, np.float32)
        edited = torch.from_numpy(edited.reshape(subject["image"].shape))[None]
        before, _ = oracle_predict(oracle, images[index : index + 1])
        after, _ = oracle_predict(oracle, edited)
        mask, healthy = torch.from_numpy(subject["mask"])[None], torch.from_numpy(subject["healthy"])[None]
        auroc = compute_localization_auroc(DifferenceMap(sigma=1.5)(images[index : index + 1], edited), mask)
        outside = compute_masked_l1(edited, healthy, mask, "outside")
        k = label_names.index(name)
        print(
            f"{name:>13}: removed {record['removed'] or 'nothing'}; head p {record['probabilities_before'][name]:.2f} "
            f"-> {record['probabilities_after'][name]:.2f}; oracle p {before[0, k]:.2f} -> {after[0, k]:.2f}; "
            f"localisation AUROC {float(auroc[0]):.2f}; L1 to the twin outside the finding {float(outside[0]):.3f}"
        )
    print("wrote", ", ".join(record["files"]["panel"] for record in manifest["items"]), "to", args.output_dir)


if __name__ == "__main__":
    main()
