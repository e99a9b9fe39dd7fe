"""Scans as users bring them, through the counterfactual and phrase grounding bundles from another folder.

Writes held-out abnormal phantoms as a 2048x2048 16-bit PNG, a 16-bit DICOM radiograph (512x512, 0.35 mm pixels)
and a 1 mm brain NIfTI (200^3), runs both bundles' inference.json on them with --bundle_root from a temporary
working directory, and prints, per scan and bundle, the output's shape and affine against the scan's and the
localisation AUROC of the difference map (or heat map) against the phantom's own finding mask on the scan's grid.

    python bundles/counterfactual/scripts/user_formats.py [--out /tmp/user_formats] [--small] [--per_format 20] \
        [--only volumes] [--volume_configs 3d.json 3d_lesion.json]

``--small`` uses 256^2, 128^2 and a 3 mm 64^3 brain (what tests/bundles/test_user_formats.py runs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from monai_cfx.data import generate_phantom
from monai_cfx.metrics import compute_localization_auroc

BUNDLES = Path(__file__).resolve().parents[2]


def write_dicom(path: Path, image: np.ndarray, spacing: float) -> None:
    """A 16-bit monochrome radiograph (Digital X-Ray) of ``image`` (X, Y) in [0, 1], as pydicom writes it."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        "DX",
        "phantom",
        generate_uid(),
        generate_uid(),
    )
    pixels = np.round(np.clip(image, 0, 1) * 4095).astype(np.uint16).T  # rows are the image's second axis
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelData = pixels.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _one_finding(kind: str, seeds: range, size: int, count: int) -> list[dict]:
    """The first ``count`` phantoms of ``seeds`` with exactly one finding, whose mask is not empty at this size."""
    subjects: list[dict] = []
    if count == 0:
        return subjects
    for seed in seeds:
        subject = generate_phantom(kind, seed, size)
        if len(subject["findings"]) == 1 and subject["mask"].any():
            subjects.append(subject)
            if len(subjects) == count:
                return subjects
    raise ValueError(f"only {len(subjects)} one-finding {kind} phantoms in seeds {seeds}, {count} asked for.")


def write_scans(folder: Path, small: bool, per_format: int = 1, only: str | None = None) -> list[dict]:
    """Abnormal held-out phantoms (seeds from the bundles' testing splits: 1850 on in 2D, 900 on in 3D), ``per_format``
    of each format (``only``: "radiographs" or "volumes"), with their finding masks and a phrase for grounding;
    returns the datalist items."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    png_size, dicom_size, brain_size = (256, 128, 64) if small else (2048, 512, 200)
    suffix = (lambda index: "") if per_format == 1 else (lambda index: f"_{index}")
    radiographs, volumes = (per_format if only != "volumes" else 0), (per_format if only != "radiographs" else 0)
    for index, chest in enumerate(_one_finding("chest", range(1850, 2000), png_size, radiographs)):
        name = f"chest_16bit{suffix(index)}.png"
        Image.fromarray(np.round(chest["image"][0] * 65535).astype(np.uint16).T).save(folder / name)
        items.append(dict(image=name, mask=chest["mask"][0], report=chest["report"], phrase=chest["phrases"][0]))
    for index, chest in enumerate(_one_finding("chest", range(1860, 2000), dicom_size, radiographs)):
        name = f"chest{suffix(index)}.dcm"
        write_dicom(folder / name, chest["image"][0], spacing=350.0 / dicom_size)
        items.append(dict(image=name, mask=chest["mask"][0], report=chest["report"], phrase=chest["phrases"][0]))
    for index, brain in enumerate(
        _one_finding("brain", range(950 if per_format == 1 else 900, 1000), brain_size, volumes)
    ):
        name = f"brain{suffix(index)}.nii.gz"
        nib.save(nib.Nifti1Image(brain["image"][0].astype(np.float32) * 1800.0, brain["affine"]), folder / name)
        items.append(dict(image=name, mask=brain["mask"][0], report=brain["report"], phrase=brain["phrases"][0]))
    return items


def run_bundle(bundle: str, configs: list[str], datalist: Path, out: Path, cwd: Path) -> float:
    root = BUNDLES / bundle
    command = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(root), "--config_file"]
    command += [str([str(root / "configs" / name) for name in configs]), "--datalist", str(datalist)]
    command += ["--dataset_dir", str(datalist.parent), "--output_dir", str(out), "--data_list_key", "testing"]
    start = time.perf_counter()
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if result.returncode != 0:
        raise RuntimeError(f"{bundle} failed on {datalist}:\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def measure(items: list[dict], folder: Path, out: Path, volume_configs: tuple[str, ...] = ("3d.json",)) -> list[dict]:
    """Run both bundles on the scans (one run per bundle for the 2D scans, one for the volumes, with
    ``volume_configs`` merged after ``inference.json``); return one row per scan and bundle."""
    rows = []
    for volume in (False, True):
        group = [item for item in items if item["image"].endswith(".nii.gz") == volume]
        if not group:
            continue
        name = "volumes" if volume else "radiographs"
        datalist = folder / f"{name}.json"
        entries = [{"image": i["image"], "prompt": "", "report": i["report"], "phrases": [i["phrase"]]} for i in group]
        datalist.write_text(json.dumps({"testing": entries}))
        for bundle, key, manifest in (
            ("counterfactual", "difference", "counterfactuals.json"),
            ("phrase_grounding", "heatmap", "grounding.json"),
        ):
            target = out / f"{bundle}_{name}"
            with tempfile.TemporaryDirectory() as elsewhere:
                seconds = run_bundle(
                    bundle, ["inference.json", *(volume_configs if volume else ())], datalist, target, Path(elsewhere)
                )
            records = {Path(r["image"]).name: r for r in json.loads((target / manifest).read_text())}
            for item in group:
                record = records[Path(item["image"]).name]
                written = nib.load(target / record[key])
                result = np.asarray(written.dataobj, dtype=np.float32)
                mask = item["mask"] > 0.5
                auroc = compute_localization_auroc(
                    torch.as_tensor(result)[None, None], torch.as_tensor(mask)[None, None]
                )
                scan = nib.load(folder / item["image"]) if volume else None
                rows.append(
                    dict(
                        scan=item["image"],
                        bundle=bundle,
                        input_shape=list(mask.shape),
                        output_shape=list(result.shape),
                        same_affine=bool(scan is None or np.allclose(written.affine, scan.affine, atol=1e-4)),
                        auroc=round(float(auroc[0]), 3),
                        seconds_per_run=round(seconds, 1),
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/user_formats")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--per_format", type=int, default=1, help="held-out phantoms per format (summary: their mean)")
    parser.add_argument("--only", choices=["radiographs", "volumes"], default=None, help="one kind of scan only")
    parser.add_argument(
        "--volume_configs", nargs="+", default=["3d.json"], help="merged after inference.json for the volumes, e.g. "
        "3d.json 3d_lesion.json (the latent diffusion bundle's 3D lesion recipe)"
    )  # fmt: skip
    args = parser.parse_args()
    if args.per_format < 1:
        raise ValueError(f"--per_format must be at least 1, got {args.per_format}.")
    out = Path(args.out)
    items = write_scans(out / "scans", args.small, args.per_format, args.only)
    rows = measure(items, out / "scans", out, tuple(args.volume_configs))
    summary = {}
    for row in rows:
        key = f"{re.sub(r'_[0-9]+(?=[.])', '', row['scan'])} {row['bundle']}"  # the format, without the index
        summary.setdefault(key, []).append(row["auroc"])
    summary = {
        key: {"n": len(v), "auroc_mean": round(float(np.mean(v)), 3), "auroc_median": round(float(np.median(v)), 3)}
        for key, v in summary.items()
    }
    print(json.dumps(summary, indent=1))
    (out / "user_formats.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
