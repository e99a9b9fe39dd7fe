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
"""GradientAllReduce in two gloo processes on MONAI's SupervisedTrainer: the same weights as one process that
trains on the union of the processes' batches, and a check that catches processes that drifted apart."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from monai_cfx.handlers import GradientAllReduce


def _data() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(8, 4, generator=generator), torch.randn(8, 3, generator=generator)
    return [{"image": x, "label": y} for x, y in zip(inputs, targets)]


class _Network(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        self.unused = torch.nn.Linear(2, 2)  # never called: its parameters get no gradient in any process

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _network(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _Network()


def _train(network: torch.nn.Module, items: list, batch_size: int, handler: GradientAllReduce | None = None):
    optimizer = torch.optim.Adam(network.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=False)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=network, optimizer=optimizer,
        loss_function=torch.nn.MSELoss(), decollate=False,
    )  # fmt: skip
    if handler is not None:
        handler.attach(trainer)
    trainer.run()
    return network


def _worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        items = _data()
        # process r takes items 2r, 2r+1, 2r+4, 2r+5: with batches of 2 its steps hold half of each 4-item batch
        share = [items[i] for i in range(8) if (i // 2) % world_size == rank]
        network = _network(seed=rank)  # other initial weights per process: the handler broadcasts rank 0's
        _train(network, share, batch_size=2, handler=GradientAllReduce(network.parameters(), bucket_elements=7))
        torch.save({k: v.clone() for k, v in network.state_dict().items()}, Path(out) / f"rank{rank}.pt")
        torch.save({name: p.grad is None for name, p in network.named_parameters()}, Path(out) / f"grads{rank}.pt")
        # processes that train without the reduction drift apart: the check at the end must catch it
        network = _network(seed=0)
        check = GradientAllReduce(network.parameters())
        check.attach = lambda engine: engine.add_event_handler(Events.COMPLETED, check.check)  # type: ignore
        try:
            _train(network, share, batch_size=2, handler=check)
        except RuntimeError as error:
            Path(out, f"error{rank}.txt").write_text(str(error))
    finally:
        dist.destroy_process_group()


class TestGradientAllReduce(unittest.TestCase):
    def test_two_processes_train_as_one_on_the_union_of_their_batches(self):
        out = Path(tempfile.mkdtemp())
        mp.spawn(_worker, args=(2, str(out / "rendezvous"), str(out)), nprocs=2, join=True)
        reference = _train(_network(seed=0), _data(), batch_size=4)
        expected = reference.state_dict()
        for rank in (0, 1):
            state = torch.load(out / f"rank{rank}.pt", weights_only=True)
            for name, tensor in expected.items():
                torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
            grads = torch.load(out / f"grads{rank}.pt", weights_only=True)
            self.assertTrue(grads["unused.weight"])  # no gradient anywhere: left without one
            self.assertFalse(grads["body.0.weight"])
        trained = torch.load(out / "rank0.pt", weights_only=True)
        self.assertFalse(torch.equal(trained["body.0.weight"], _network(seed=0).state_dict()["body.0.weight"]))
        # without the reduction, the processes drift apart and the check says so in both
        for rank in (0, 1):
            self.assertIn("differ from rank 0's", (out / f"error{rank}.txt").read_text())

    def test_bad_arguments(self):
        frozen = torch.nn.Linear(2, 2).requires_grad_(False)
        with self.assertRaisesRegex(ValueError, "no parameter that requires a gradient"):
            GradientAllReduce(frozen.parameters())
        with self.assertRaisesRegex(ValueError, "bucket_elements"):
            GradientAllReduce(torch.nn.Linear(2, 2).parameters(), bucket_elements=0)


if __name__ == "__main__":
    unittest.main()
