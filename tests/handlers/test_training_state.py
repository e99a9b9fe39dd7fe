"""TrainingStateHandler: a run killed with SIGKILL and resumed in a new process ends exactly where an uninterrupted
run does; states from other settings, truncated files and pickled code are refused, and saving is atomic."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from ignite.engine import Engine
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler
from monai.transforms import RandGaussianNoised
from monai.utils import set_determinism

from monai_cfx.handlers import TrainingStateHandler

REPO = Path(__file__).resolve().parents[2]
MAX_EPOCHS, NUM_ITEMS, BATCH_SIZE = 4, 20, 4  # 5 iterations per epoch
FINGERPRINT = {"seed": 0, "batch_size": BATCH_SIZE, "learning_rate": 0.01}

# run by the subprocesses: python <script> <state path> <result path> <marker path> <mode>
SCRIPT = """
import logging, sys, time
sys.path.insert(0, {repo!r})
from ignite.engine import Events
from tests.handlers.test_training_state import train

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
state_path, result_path, marker, mode = sys.argv[1:5]


def pause_in_epoch_3(engine):
    # the kill lands in the middle of epoch 3: weights and random states have moved on since the saved epoch 2
    if engine.state.epoch == 3 and engine.state.iteration % engine.state.epoch_length == 2:
        open(marker, "w").close()
        time.sleep(600)


extra = [(Events.ITERATION_COMPLETED, pause_in_epoch_3)] if mode == "killed" else []
train(state_path, result_path, extra)
"""


class NoisyPrepareBatch:
    """Inputs with noise from the global torch RNG, a seeded ``torch.Generator``, numpy's and Python's RNGs."""

    def __init__(self, seed: int = 1) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        image = batchdata["image"].to(device)
        noise = 0.1 * torch.randn_like(image) + 0.1 * torch.rand(image.shape, generator=self.generator)
        shift = 0.01 * (float(np.random.rand()) + random.random())
        return image + noise + shift, batchdata["label"].to(device)


def train(state_path, result_path, extra_handlers=()) -> None:
    """Train a dropout MLP for ``MAX_EPOCHS`` epochs on shuffled data with a random augmentation, with a
    ``TrainingStateHandler`` at ``state_path``; save the final network, optimizer and scheduler to ``result_path``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        set_determinism(seed=0)
        data_generator = torch.Generator().manual_seed(123)
        data = [
            {"image": torch.randn(8, generator=data_generator), "label": torch.randn(2, generator=data_generator)}
            for _ in range(NUM_ITEMS)
        ]
        dataset = Dataset(data, transform=RandGaussianNoised(keys="image", prob=0.5, std=0.05))
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=0)
        network = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2)
        )
        optimizer = torch.optim.Adam(network.parameters(), lr=FINGERPRINT["learning_rate"])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
        prepare_batch = NoisyPrepareBatch()
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=MAX_EPOCHS,
            train_data_loader=loader,
            network=network,
            optimizer=optimizer,
            loss_function=torch.nn.MSELoss(),
            prepare_batch=prepare_batch,
            train_handlers=[LrScheduleHandler(scheduler, print_lr=False)],
        )
        handler = TrainingStateHandler(
            state_path,
            {"network": network, "optimizer": optimizer, "scheduler": scheduler, "trainer": trainer},
            generators=[prepare_batch.generator],
            fingerprint=FINGERPRINT,
            randomizables=[dataset],
        )
        handler.attach(trainer)
        for event, function in extra_handlers:
            trainer.add_event_handler(event, function)
        trainer.run()
        result = {
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": trainer.state.epoch,
        }
        torch.save(result, result_path)
    finally:
        torch.set_num_threads(threads)


def assert_same(test: unittest.TestCase, first, second, where: str = "") -> None:
    """Nested dicts, lists and tensors equal, tensors with ``torch.equal``."""
    if isinstance(first, torch.Tensor):
        test.assertTrue(isinstance(second, torch.Tensor) and torch.equal(first, second), where)
    elif isinstance(first, dict):
        test.assertEqual(set(first), set(second), where)
        for key in first:
            assert_same(test, first[key], second[key], f"{where}/{key}")
    elif isinstance(first, (list, tuple)):
        test.assertEqual(len(first), len(second), where)
        for index, (a, b) in enumerate(zip(first, second)):
            assert_same(test, a, b, f"{where}/{index}")
    else:
        test.assertEqual(first, second, where)


def run_tiny(path, fingerprint=None, max_epochs: int = 2, **kwargs) -> Engine:
    """An ignite engine with a linear layer and its optimizer, saved and resumed at ``path``."""
    network = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

    def step(engine, batch):
        optimizer.zero_grad()
        network(torch.full((1, 2), float(batch))).sum().backward()
        optimizer.step()

    engine = Engine(step)
    save_dict = {"network": network, "optimizer": optimizer, "trainer": engine}
    TrainingStateHandler(path, save_dict, fingerprint=fingerprint, **kwargs).attach(engine)
    engine.run([1, 2, 3], max_epochs=max_epochs)
    return engine


def _touch(path):
    """What the pickled payload would run."""
    Path(path).touch()
    return {}


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


class TestTrainingStateResume(unittest.TestCase):
    def test_killed_and_resumed_run_equals_an_uninterrupted_one(self):
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            train(folder / "uninterrupted.pt", folder / "uninterrupted_result.pt")
            script = folder / "run.py"
            script.write_text(SCRIPT.format(repo=str(REPO)))
            state, marker = folder / "run" / "training_state.pt", folder / "marker"
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

            def command(mode, result):
                return [sys.executable, str(script), str(state), str(folder / result), str(marker), mode]

            log = folder / "killed.log"
            with open(log, "wb") as output:
                killed = subprocess.Popen(command("killed", "killed_result.pt"), env=env, cwd=REPO, stdout=output,
                                          stderr=subprocess.STDOUT)  # fmt: skip
                try:
                    deadline = time.monotonic() + 120
                    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
                        time.sleep(0.05)
                    self.assertTrue(marker.exists(), log.read_text()[-3000:])
                    killed.send_signal(signal.SIGKILL)
                    killed.wait(30)
                finally:
                    if killed.poll() is None:
                        killed.kill()
                        killed.wait()
            self.assertEqual(killed.returncode, -signal.SIGKILL)
            self.assertFalse((folder / "killed_result.pt").exists())
            saved = torch.load(state, weights_only=True)
            self.assertEqual(saved["objects"]["trainer"]["iteration"], 2 * NUM_ITEMS // BATCH_SIZE)  # epoch 2
            self.assertEqual(saved["fingerprint"], FINGERPRINT)

            resumed = subprocess.run(
                command("resume", "resumed_result.pt"), env=env, cwd=REPO, capture_output=True, text=True, timeout=300
            )
            self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
            self.assertIn("resuming training from", resumed.stderr)
            self.assertIn("epoch 2, iteration 10", resumed.stderr)
            expected = torch.load(folder / "uninterrupted_result.pt", weights_only=True)
            got = torch.load(folder / "resumed_result.pt", weights_only=True)
            self.assertEqual(got["epoch"], MAX_EPOCHS)
            assert_same(self, expected, got)
            # the final states hold the same random states too
            final = torch.load(state, weights_only=True)
            assert_same(self, torch.load(folder / "uninterrupted.pt", weights_only=True), final)
            self.assertEqual([p.name for p in state.parent.iterdir()], ["training_state.pt"])  # no temporaries


class TestTrainingStateRefusals(unittest.TestCase):
    def setUp(self):
        self.folder = Path(tempfile.mkdtemp())
        self.path = self.folder / "training_state.pt"

    def tearDown(self):
        shutil.rmtree(self.folder, ignore_errors=True)

    def test_resumes_and_continues_with_more_epochs(self):
        run_tiny(self.path, {"seed": 0}, max_epochs=2)
        self.assertEqual(torch.load(self.path, weights_only=True)["objects"]["trainer"]["iteration"], 6)
        with self.assertLogs("monai_cfx.handlers.training_state", level="INFO") as logs:
            engine = run_tiny(self.path, {"seed": 0}, max_epochs=3)
        self.assertIn("epoch 2, iteration 6", "\n".join(logs.output))
        self.assertEqual((engine.state.epoch, engine.state.iteration), (3, 9))
        with self.assertRaisesRegex(ValueError, "beyond this run's max_epochs"):
            run_tiny(self.path, {"seed": 0}, max_epochs=1)

    def test_mixed_precision_scaler_is_saved_and_restored(self):
        # MONAI's trainers hold a GradScaler with amp; its loss scale (here doubled every iteration) is part of the run
        def run(max_epochs, with_scaler=True):
            network = torch.nn.Linear(2, 1)
            optimizer = torch.optim.SGD(network.parameters(), lr=0.01)

            def step(engine, batch):
                optimizer.zero_grad()
                loss = network(torch.full((1, 2), float(batch))).sum()
                if engine.scaler is None:
                    loss.backward()
                    optimizer.step()
                    return
                engine.scaler.scale(loss).backward()
                engine.scaler.step(optimizer)
                engine.scaler.update()

            engine = Engine(step)
            engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0, growth_interval=1) if with_scaler else None
            TrainingStateHandler(self.path, {"network": network, "optimizer": optimizer, "trainer": engine}).attach(
                engine
            )
            engine.run([1, 2, 3], max_epochs=max_epochs)
            return engine

        self.assertEqual(run(2).scaler.get_scale(), 2.0 * 2**6)
        self.assertEqual(torch.load(self.path, weights_only=True)["objects"]["grad_scaler"]["scale"], 2.0 * 2**6)
        self.assertEqual(run(3).scaler.get_scale(), 2.0 * 2**9)  # resumed at 2**6, not afresh at 2**0
        # a state saved without a scaler (a CPU run) resumes with a fresh one, and says so
        self.path.unlink()
        run(1, with_scaler=False)
        with self.assertLogs("monai_cfx.handlers.training_state", level="WARNING") as logs:
            engine = run(2)
        self.assertIn("no 'grad_scaler'", "\n".join(logs.output))
        self.assertEqual(engine.scaler.get_scale(), 2.0 * 2**3)

    def test_other_fingerprint_is_refused_naming_the_file_and_keys(self):
        run_tiny(self.path, {"seed": 0, "batch_size": 4, "lr": 0.1})
        before = self.path.read_bytes()
        with self.assertRaises(ValueError) as raised:
            run_tiny(self.path, {"seed": 1, "batch_size": 4, "lr": 0.2})
        message = str(raised.exception)
        self.assertIn(str(self.path), message)
        self.assertIn("seed", message)
        self.assertIn("lr", message)
        self.assertNotIn("batch_size", message)
        self.assertEqual(self.path.read_bytes(), before)
        run_tiny(self.path, {"seed": 1}, resume=False)  # starting afresh on purpose replaces it
        self.assertEqual(torch.load(self.path, weights_only=True)["fingerprint"], {"seed": 1})

    def test_truncated_file_is_refused_and_left_unchanged(self):
        run_tiny(self.path)
        truncated = self.path.read_bytes()[: self.path.stat().st_size // 2]
        self.path.write_bytes(truncated)
        with self.assertRaisesRegex(ValueError, "cannot read the training state") as raised:
            run_tiny(self.path)
        self.assertIn(str(self.path), str(raised.exception))
        self.assertEqual(self.path.read_bytes(), truncated)
        self.assertEqual([p.name for p in self.folder.iterdir()], [self.path.name])

    def test_not_a_training_state_is_refused(self):
        torch.save({"network": torch.zeros(2)}, self.path)
        with self.assertRaisesRegex(ValueError, "is not a training state") as raised:
            run_tiny(self.path)
        self.assertIn(str(self.path), str(raised.exception))

    def test_pickled_code_is_not_executed(self):
        marker = self.folder / "executed"
        state = {"format_version": 1, "fingerprint": {}, "objects": {"network": Payload(str(marker))}, "random": []}
        torch.save(state, self.path)
        before = self.path.read_bytes()
        with self.assertRaisesRegex(ValueError, "weights_only") as raised:
            run_tiny(self.path)
        self.assertIn(str(self.path), str(raised.exception))
        self.assertFalse(marker.exists())
        self.assertEqual(self.path.read_bytes(), before)
        torch.load(self.path, weights_only=False)  # the payload is live: a full unpickling would have run it
        self.assertTrue(marker.exists())

    def test_a_failed_write_keeps_the_previous_state(self):
        run_tiny(self.path, max_epochs=1)
        before = self.path.read_bytes()

        def dying_save(obj, f, *args, **kwargs):
            f.write(b"partial")
            raise OSError("disk full")

        with mock.patch.object(torch, "save", dying_save), self.assertRaisesRegex(OSError, "disk full"):
            run_tiny(self.path, max_epochs=2)
        self.assertEqual(self.path.read_bytes(), before)
        self.assertEqual([p.name for p in self.folder.iterdir()], [self.path.name])
        # a temporary left by a killed writer is removed when the next run starts
        (self.folder / f".{self.path.name}.abc123.tmp.pt").write_bytes(b"partial")
        run_tiny(self.path, max_epochs=2)
        self.assertEqual([p.name for p in self.folder.iterdir()], [self.path.name])

    def test_arguments_are_checked(self):
        with self.assertRaisesRegex(ValueError, "state_dict"):
            TrainingStateHandler(self.path, {"network": object()})
        with self.assertRaisesRegex(ValueError, "save_interval"):
            TrainingStateHandler(self.path, {"network": torch.nn.Linear(1, 1)}, save_interval=0)
        with self.assertRaisesRegex(ValueError, "torch.Generator"):
            TrainingStateHandler(self.path, {"network": torch.nn.Linear(1, 1)}, generators=[np.random.default_rng()])
        with self.assertRaisesRegex(ValueError, "JSON"):
            TrainingStateHandler(self.path, {"network": torch.nn.Linear(1, 1)}, fingerprint={"f": object()})


if __name__ == "__main__":
    unittest.main()
