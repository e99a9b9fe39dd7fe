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
"""Command line: write a phantom dataset and its MONAI datalist.

Example::

    python -m monai_cfx.data --kind chest --num 1000 --out data/chest --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .dataset import PHANTOM_KINDS, write_phantom_dataset

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_cfx.data", description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=PHANTOM_KINDS, default="chest", help="chest (2D) or brain (3D)")
    parser.add_argument("--num", type=int, default=100, help="number of subjects")
    parser.add_argument("--out", required=True, help="output folder (datalist.json, images/, png/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first subject")
    parser.add_argument("--size", type=int, default=None, help="image side (default 128 chest, 64 brain)")
    parser.add_argument("--domain", default=None, help="'source', 'target' or a JSON object of domain settings")
    parser.add_argument("--age", type=float, default=None, help="brain only: fixed age in years")
    parser.add_argument("--split", default="0.8,0.1,0.1", help="training,validation,testing fractions")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    domain = args.domain
    if domain is not None and domain.strip().startswith("{"):
        domain = json.loads(domain)
    kwargs = {"domain": domain}
    if args.age is not None:
        if args.kind != "brain":
            parser.error("--age applies to --kind brain only")
        kwargs["age"] = args.age
    try:
        summary = write_phantom_dataset(
            args.out,
            kind=args.kind,
            num=args.num,
            seed=args.seed,
            size=args.size,
            split=[float(f) for f in args.split.split(",")],
            num_workers=args.workers,
            overwrite=args.overwrite,
            **kwargs,
        )
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
