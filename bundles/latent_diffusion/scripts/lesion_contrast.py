"""How much of a finding an autoencoder keeps: the finding's contrast in the reconstruction over its contrast in the
input, on held-out phantoms whose healthy twins are known.

For each phantom with a finding: ``mean over the finding's voxels of |AE(image) - AE(healthy)|`` divided by
``mean over the same voxels of |image - healthy|``. 1 keeps the finding as it is, 0 erases it. The phantoms are
drawn from seed 700,000 on (no split of the bundle uses them), one finding each.

    python bundles/latent_diffusion/scripts/lesion_contrast.py --dims 3d [--model_dir <folder>] \
        [--override autoencoder_channels=[16,32]]

``--dims 3d_lesion`` measures the autoencoder of ``configs/3d_lesion.json`` (merged after ``configs/3d.json``), and
``--dims 2d_lesion`` that of ``configs/2d_lesion.json``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.data import generate_phantom
from monai_cfx.metrics import compute_finding_contrast_kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="3d", choices=["2d", "3d", "2d_lesion", "3d_lesion"])
    parser.add_argument(
        "--model_dir", default=None, help="folder of the autoencoder's weights (default: the shipped ones)"
    )
    parser.add_argument("--override", nargs="*", default=[], help="config overrides key=json, e.g. latent_channels=8")
    parser.add_argument("--num", type=int, default=64)
    args = parser.parse_args()
    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.override)}
    if args.model_dir:
        overrides["model_dir"] = args.model_dir
    configs = ["configs/inference.json"] + (["configs/3d.json"] if args.dims.startswith("3d") else [])
    configs += [f"configs/{args.dims}.json"] if args.dims.endswith("_lesion") else []
    config = load_bundle_config(default_bundle_dir(), configs, device="cpu", **overrides)
    autoencoder = config.get_parsed_content("load_autoencoder").eval()
    kind, size = config.get_parsed_content("kind"), config.get_parsed_content("image_size")
    finding = "lesion" if kind == "brain" else "nodule"
    subjects = [generate_phantom(kind, 700_000 + index, size, findings=[finding]) for index in range(args.num)]
    subjects = [subject for subject in subjects if subject["mask"].any()]

    def stack(key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([subject[key] for subject in subjects])).float()

    images, healthy, masks = stack("image"), stack("healthy"), stack("mask")
    ratios = compute_finding_contrast_kept(autoencoder, images, healthy, masks).numpy()
    contrasts = [float((i - h).abs()[m > 0].mean()) for i, h, m in zip(images, healthy, masks)]
    print(json.dumps({"dims": args.dims, "finding": finding, "num": len(ratios), "overrides": overrides,
                      "input_contrast": float(np.mean(contrasts)), "contrast_ratio": float(np.mean(ratios)),
                      "contrast_ratio_median": float(np.median(ratios))}))  # fmt: skip


if __name__ == "__main__":
    main()
