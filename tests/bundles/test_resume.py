"""All or nothing per run, and resuming: a bundle run killed (SIGKILL) or interrupted (Ctrl-C) midway leaves
nothing in its output folder; the next run with the same items and settings finishes only the missing items, and
its outputs equal an uninterrupted run's. A run with other settings starts afresh."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_cfx.handlers import CounterfactualSaver
from tests.helpers import BUNDLES, TempFolderCase

BUNDLE = BUNDLES / "counterfactual"


class TestKilledRunResumes(TempFolderCase):
    def command(self, out: Path, *extra: str) -> list[str]:
        command = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE)]
        command += ["--config_file", str(BUNDLE / "configs" / "inference.json"), "--output_dir", str(out)]
        command += ["--dataset_dir", str(self.tmp / "data"), "--num_subjects", "80", "--seed", "5000"]
        # 8 items of 20 steps: each takes long enough that a stopped run is always stopped before its last item
        return command + ["--num_items", "8", "--batch_size", "1", "--num_inference_steps", "20", *extra]

    def start(self, out: Path, *extra: str) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        # Ctrl-C as in a terminal: a test run started in the background (no job control) ignores SIGINT, and a
        # child would inherit the ignored signal
        return subprocess.Popen(
            self.command(out, *extra),
            cwd=self.tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    @staticmethod
    def staged_records(staging: Path) -> int:
        try:
            return len(json.loads((staging / "progress.json").read_text())["records"])
        except (OSError, ValueError, KeyError):
            return 0

    def stop_after(self, process: subprocess.Popen, staging: Path, records: int, sig: int) -> str:
        deadline = time.time() + 300
        while self.staged_records(staging) < records and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        self.assertIsNone(process.poll(), "the run ended before it could be stopped")
        process.send_signal(sig)
        output, _ = process.communicate(timeout=120)
        self.assertNotEqual(process.returncode, 0, "the run finished before the signal")
        return output

    def test_kill_interrupt_resume(self):
        out = self.tmp / "out"
        staging = out.parent / ".out.counterfactuals.partial"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        # the phantom data set is written by a first, complete run elsewhere (so the killed runs time only items)
        reference = self.tmp / "reference"
        done = subprocess.run(self.command(reference), cwd=self.tmp, env=env, capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])

        self.stop_after(self.start(out), staging, 1, signal.SIGKILL)
        self.assertFalse(out.exists(), "a killed run left outputs")
        first = self.staged_records(staging)
        self.assertGreaterEqual(first, 1)

        log = self.stop_after(self.start(out), staging, first + 1, signal.SIGINT)
        self.assertIn(f"resuming an unfinished run: {first} of 8 items", log)
        self.assertFalse(out.exists(), "an interrupted run left outputs")
        second = self.staged_records(staging)
        self.assertGreater(second, first)

        final = subprocess.run(self.command(out), cwd=self.tmp, env=env, capture_output=True, text=True)
        self.assertEqual(final.returncode, 0, final.stderr[-3000:])
        self.assertIn(f"resuming an unfinished run: {second} of 8 items", final.stdout + final.stderr)
        self.assertFalse(staging.exists())
        records = json.loads((out / "counterfactuals.json").read_text())
        expected = json.loads((reference / "counterfactuals.json").read_text())
        self.assertEqual(sorted(r["image"] for r in records), sorted(r["image"] for r in expected))
        for record in expected:
            resumed = nib.load(out / record["counterfactual"]).get_fdata()
            self.assertTrue(np.allclose(resumed, nib.load(reference / record["counterfactual"]).get_fdata(), atol=1e-5))


class TestStagingFolder(unittest.TestCase):
    def test_other_items_or_settings_start_afresh(self):
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "out"
            items = [{"image": f"/data/{i}.nii.gz"} for i in range(3)]
            saver = CounterfactualSaver(out, run_settings={"noise_strength": 0.6})
            self.assertEqual(saver.pending(items), items)
            saver.staging_dir.mkdir()
            progress = {"fingerprint": saver._run_fingerprint, "records": [{"image": "/data/0.nii.gz"}], "stems": ["0"]}
            (saver.staging_dir / "progress.json").write_text(json.dumps(progress))
            self.assertEqual(CounterfactualSaver(out, run_settings={"noise_strength": 0.6}).pending(items), items[1:])
            self.assertTrue(saver.staging_dir.exists())
            self.assertEqual(CounterfactualSaver(out, run_settings={"noise_strength": 0.4}).pending(items), items)
            self.assertFalse(saver.staging_dir.exists())
            self.assertFalse(out.exists())


if __name__ == "__main__":
    unittest.main()
