"""Phantom generation and writing speed, as ratios against the targets (run: python benchmarks/phantom_generation.py).

Target: 1,000 2D subjects at 128x128 written (NIfTI + PNG for image, healthy and mask, plus the datalist)
in under 60 s on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from monai_cfx.data import brain_phantom, chest_phantom, write_phantom_dataset

WRITE_TARGET_SECONDS_PER_1000 = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1000)
    args = parser.parse_args()

    start = time.perf_counter()
    for seed in range(200):
        chest_phantom(seed)
    chest_ms = (time.perf_counter() - start) / 200 * 1000
    start = time.perf_counter()
    for seed in range(20):
        brain_phantom(seed)
    brain_ms = (time.perf_counter() - start) / 20 * 1000
    with tempfile.TemporaryDirectory() as out:
        summary = write_phantom_dataset(out, "chest", num=args.num, seed=0)
    per_1000 = summary["seconds"] / args.num * 1000
    print(f"chest 128x128 generate: {chest_ms:.2f} ms/subject")
    print(f"brain 64^3 generate:    {brain_ms:.2f} ms/subject")
    print(f"write {args.num} chest subjects: {summary['seconds']:.1f} s ({per_1000:.1f} s per 1000)")
    print(
        f"ratio write time / target ({WRITE_TARGET_SECONDS_PER_1000:.0f} s per 1000): "
        f"{per_1000 / WRITE_TARGET_SECONDS_PER_1000:.2f} (goal <= 1)"
    )


if __name__ == "__main__":
    main()
