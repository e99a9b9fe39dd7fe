"""Add the training latents' per-channel range to a scale factor file written before diffusion training recorded it.

``train_diffusion.json`` now writes ``latent_range`` (``monai_cfx.engines.compute_latent_range``: the per-channel
minimum and maximum of the scaled latents of the batches the scale factor is measured on) beside the scale factor,
and sampling clips the predicted clean latent to it (``inference.json``, ``clip_original_sample``). This script
measures it exactly as a training run does: the training config's ``initialize`` (the seed), the scale factor (which
must equal the file's, or the file belongs to another autoencoder or data), then the range; it rewrites the file
with the range added and everything else kept.

    python bundles/latent_diffusion/scripts/latent_range.py --dims 2d [--model_dir <folder>]

``--dims 3d_lesion`` (and ``2d_lesion``) merge that recipe's config as training does.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.utils import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="2d", choices=["2d", "3d", "2d_lesion", "3d_lesion"])
    parser.add_argument("--model_dir", default=None, help="folder of the weights (default: the shipped ones)")
    args = parser.parse_args()
    configs = ["configs/inference.json", "configs/train_diffusion.json"]
    configs += ["configs/3d.json"] if args.dims.startswith("3d") else []
    configs += [f"configs/{args.dims}.json"] if args.dims.endswith("_lesion") else []
    overrides = {"model_dir": args.model_dir} if args.model_dir else {}
    config = load_bundle_config(default_bundle_dir(), configs, device="cpu", **overrides)
    path = Path(config.get_parsed_content("scale_factor_path"))
    recorded = json.loads(path.read_text())
    config.get_parsed_content("initialize")  # the training run's seed
    scale_factor = config.get_parsed_content("scale_factor")
    if not math.isclose(scale_factor, recorded["scale_factor"], rel_tol=1e-6):
        raise ValueError(
            f"{str(path)!r} records scale factor {recorded['scale_factor']}, the training config measures "
            f"{scale_factor}: the file belongs to another autoencoder or training data."
        )
    recorded["latent_range"] = config.get_parsed_content("latent_range")
    write_json(recorded, path, overwrite=True)
    print(json.dumps({"path": str(path), **recorded}))


if __name__ == "__main__":
    main()
