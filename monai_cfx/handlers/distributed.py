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
"""Data-parallel training of any parameter set with MONAI's trainers: gradients averaged over the processes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from monai.engines.utils import IterationEvents
from monai.utils import IgniteInfo, min_version, optional_import

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["GradientAllReduce"]


class GradientAllReduce:
    """Average the gradients of ``parameters`` over the processes of a distributed run after every backward pass
    (MONAI's ``IterationEvents.BACKWARD_COMPLETED``, before the optimiser step), so that every process takes the
    same step: data-parallel training as ``DistributedDataParallel`` gives it, for parameter sets its wrapper does
    not fit (a fine-tuned subset of a UNet, a text encoder's new token embeddings, a classifier head called outside
    the network's ``forward``).

    At the start of the run rank 0's parameters are broadcast, so that every process starts from the same weights;
    at the end (``check_consistency``) the processes compare a checksum of the parameters and raise if they drifted
    apart. A parameter without a gradient in every process keeps none (the optimiser skips it, as in one process);
    one with a gradient in some process gets zeros in the others. Without a process group, or with one process,
    nothing is done.

    Args:
        parameters: the trained parameters (those that require a gradient are reduced).
        bucket_elements: how many gradient elements one collective carries at most.
        check_consistency: compare the processes' parameters when the run completes.

    Example::

        sync = GradientAllReduce(fine_tuning.parameters())
        sync.attach(trainer)  # a monai.engines.SupervisedTrainer
    """

    def __init__(
        self, parameters: Iterable[torch.nn.Parameter], bucket_elements: int = 2**24, check_consistency: bool = True
    ) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        if not self.parameters:
            raise ValueError("`parameters` holds no parameter that requires a gradient: there is nothing to average.")
        if isinstance(bucket_elements, bool) or not isinstance(bucket_elements, int) or bucket_elements < 1:
            raise ValueError(f"`bucket_elements` must be a positive int, got {bucket_elements!r}.")
        self.bucket_elements = bucket_elements
        self.check_consistency = check_consistency

    @staticmethod
    def world_size() -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.broadcast)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)
        if self.check_consistency:
            engine.add_event_handler(Events.COMPLETED, self.check)

    @torch.no_grad()
    def broadcast(self, engine: Engine | None = None) -> None:
        """Give every process rank 0's parameters."""
        if self.world_size() > 1:
            for parameter in self.parameters:
                dist.broadcast(parameter.data, src=0)

    @torch.no_grad()
    def __call__(self, engine: Engine | None = None) -> None:
        """Average the gradients over the processes (each process's gradient is the mean over its own batch)."""
        world_size = self.world_size()
        if world_size == 1:
            return
        device = self.parameters[0].device
        has_gradient = torch.tensor([p.grad is not None for p in self.parameters], dtype=torch.int32, device=device)
        dist.all_reduce(has_gradient)
        gradients = []
        for parameter, count in zip(self.parameters, has_gradient.tolist()):
            if count:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                gradients.append(parameter.grad)
        bucket: list[torch.Tensor] = []
        size = 0
        for gradient in gradients:
            bucket.append(gradient)
            size += gradient.numel()
            if size >= self.bucket_elements:
                self._reduce(bucket, world_size)
                bucket, size = [], 0
        if bucket:
            self._reduce(bucket, world_size)

    @staticmethod
    def _reduce(gradients: list[torch.Tensor], world_size: int) -> None:
        flat = torch.cat([g.reshape(-1) for g in gradients])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for gradient in gradients:
            gradient.copy_(flat[offset : offset + gradient.numel()].view_as(gradient))
            offset += gradient.numel()

    @torch.no_grad()
    def check(self, engine: Engine | None = None) -> None:
        """Raise when the processes' parameters differ (a parameter left out of the reduction, a process that
        skipped a step)."""
        world_size = self.world_size()
        if world_size == 1:
            return
        checksum = torch.stack([p.detach().double().sum() + p.detach().double().abs().sum() for p in self.parameters])
        gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
        dist.all_gather(gathered, checksum)
        differing = [rank for rank in range(1, world_size) if not torch.equal(gathered[rank], gathered[0])]
        if differing:
            raise RuntimeError(
                f"the trained parameters of processes {differing} differ from rank 0's at the end of the run: their "
                "updates were not the same (a parameter outside `parameters`, or a process that skipped a step)."
            )
