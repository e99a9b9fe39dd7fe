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
"""An ignite handler that saves a training run's whole state atomically and resumes it exactly after a kill."""

from __future__ import annotations

import json
import logging
import os
import random
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from monai.utils import IgniteInfo, min_version, optional_import

from monai_cfx.utils import atomic_path

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

logger = logging.getLogger(__name__)

__all__ = ["BestMetricState", "ParamSchedulerState", "SeededRunHandler", "TrainingStateHandler"]

FORMAT_VERSION = 1
_KEYS = ("format_version", "fingerprint", "objects", "random")
_RANDOM_KEYS = ("torch", "numpy", "python", "generators", "randomizables")


def _canonical(fingerprint: Mapping[str, Any] | None, what: str = "`fingerprint`") -> dict[str, Any]:
    """``fingerprint`` as JSON would give it back (tuples become lists, keys strings); ``{}`` for ``None``."""
    if fingerprint is None:
        return {}
    if not isinstance(fingerprint, Mapping):
        raise ValueError(f"{what} must be a mapping of the run's settings, got {type(fingerprint).__name__}.")
    try:
        return json.loads(json.dumps(dict(fingerprint), sort_keys=True, allow_nan=True))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON-serialisable: {error}") from error


def _numpy_state(state: tuple) -> dict[str, Any]:
    """A legacy numpy ``RandomState`` state in a form that ``torch.load(..., weights_only=True)`` accepts."""
    name, key, pos, has_gauss, cached_gaussian = state
    return {
        "bit_generator": str(name),
        "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_tuple(state: Mapping[str, Any]) -> tuple:
    """The inverse of :func:`_numpy_state`, for ``RandomState.set_state``."""
    key = np.asarray(torch.as_tensor(state["key"]).numpy(), dtype=np.uint32)
    return state["bit_generator"], key, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"])


# what the search for random states does not walk into: data, networks, and modules, classes and functions (whose
# attributes are globals or class-level defaults, not a transform's own state)
_NOT_WALKED = (
    torch.Tensor,
    np.ndarray,
    str,
    bytes,
    Mapping,
    torch.nn.Module,
    type,
    types.ModuleType,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
)


def _find_random_states(obj: Any, found: list[np.random.RandomState], seen: set[int]) -> None:
    """Collect the numpy ``RandomState`` objects held by ``obj`` (MONAI ``Randomizable`` transforms keep theirs in
    ``R``), walking object attributes, lists and tuples as ``monai.data.utils.set_rnd`` does, in a fixed order."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.random.RandomState):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _find_random_states(item, found, seen)
    elif not isinstance(obj, _NOT_WALKED) and hasattr(obj, "__dict__"):
        for key, value in vars(obj).items():
            if not key.startswith("__"):
                _find_random_states(value, found, seen)


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainingStateHandler:
    """Save a training run's whole state atomically, and resume from it exactly after the run was killed.

    The state holds every object of ``save_dict`` (networks, an EMA model, the optimizer, the learning-rate
    scheduler and the trainer engine itself under ``"trainer"``, whose ``state_dict`` is its epoch and iteration),
    the random states (torch's CPU generator, CUDA's when available, numpy's and Python's global ones, the
    ``generators`` and the numpy ``RandomState`` of each MONAI randomizable transform found in ``randomizables``),
    the run's ``fingerprint`` and a format version. A trainer with mixed precision (MONAI's ``amp``) adds its
    gradient scaler under ``"grad_scaler"``: the loss scale it has learnt is part of the run (a state saved without
    one, e.g. on a CPU, resumes with a fresh scaler and a warning). It is written every ``save_interval`` epochs and
    when the run completes: ``torch.save`` into a temporary file in the same folder, flushed to disk, then
    ``os.replace`` onto ``path``, so that a run killed while writing leaves the previous state whole.

    When the engine starts and ``path`` exists (with ``resume``), the state is read with
    ``torch.load(..., weights_only=True)`` (no code is unpickled) and restored: every object, the trainer's epoch
    and iteration (keeping the engine's own ``max_epochs``, as MONAI's ``CheckpointLoader`` does) and then the
    random states, so that the resumed run draws the same data order, noise and dropout as an uninterrupted one.
    A run killed after epoch ``k`` was saved and resumed gives exactly the weights of an uninterrupted run when
    the random numbers are only drawn from those sources, the data loader's epoch is a full pass
    (``epoch_length`` unset or its length) and no handler attached after this one draws random numbers when the
    engine starts.

    Attach it after the handlers that draw random numbers at ``EPOCH_COMPLETED`` (a validation handler): its
    state is then the one the next epoch starts from. In a distributed run every rank restores the objects and
    its own random states (gathered from every rank when saving); rank 0 alone writes the file.

    Args:
        path: the state file, e.g. ``<output_dir>/training_state.pt``; its folder is created.
        save_dict: name -> object with ``state_dict()`` and ``load_state_dict()``; the trainer under
            ``"trainer"``.
        generators: ``torch.Generator`` objects whose states are saved too (e.g. a prepare batch's prompt-dropout
            generator, :attr:`monai_cfx.engines.LatentDiffusionPrepareBatch.generator`).
        save_interval: save every this many epochs (and when the run completes).
        resume: resume from ``path`` when it exists; ``False`` starts afresh (and overwrites it when saving).
        fingerprint: a JSON-serialisable mapping of the run's settings (seed, batch size, learning rate...); a state
            saved under another fingerprint is refused on resume. Leave out what may change between a run and its
            continuation (``max_epochs``).
        randomizables: objects (a dataset, a ``Compose``, transforms) searched for MONAI randomizable transforms,
            whose numpy ``RandomState`` is saved too: with ``num_workers=0`` MONAI's ``DataLoader`` keeps the random
            augmentations' states in the main process from epoch to epoch.

    Raises:
        ValueError: on resume, when ``path`` cannot be read (truncated, corrupt, or holding anything but tensors and
            plain containers), is not a training state, misses an object of ``save_dict``, was saved under another
            ``fingerprint``, or holds more epochs than the engine's ``max_epochs``; the message names the file, and
            the file is left as it is.

    Example::

        handler = TrainingStateHandler(
            "outputs/training_state.pt",
            {"network": network, "optimizer": optimizer, "trainer": trainer},
            generators=[prepare_batch.generator],
            fingerprint={"seed": 0, "batch_size": 32, "learning_rate": 2.5e-4},
        )
        handler.attach(trainer)
        trainer.run()  # resumes from the last saved epoch when a previous run was killed
    """

    def __init__(
        self,
        path: str | os.PathLike,
        save_dict: Mapping[str, Any],
        generators: Sequence[torch.Generator] | None = None,
        save_interval: int = 1,
        resume: bool = True,
        fingerprint: Mapping[str, Any] | None = None,
        randomizables: Sequence[Any] | None = None,
    ) -> None:
        if not isinstance(save_dict, Mapping) or not save_dict:
            raise ValueError("`save_dict` must be a non-empty mapping name -> object with state_dict().")
        for name, obj in save_dict.items():
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise ValueError(
                    f"`save_dict[{name!r}]` ({type(obj).__name__}) has no state_dict() and load_state_dict()."
                )
        generators = list(generators or [])
        for index, generator in enumerate(generators):
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"`generators[{index}]` must be a torch.Generator, got {type(generator).__name__}.")
        if isinstance(save_interval, bool) or not isinstance(save_interval, int) or save_interval < 1:
            raise ValueError(f"`save_interval` must be a positive number of epochs, got {save_interval!r}.")
        self.path = Path(path)
        self.save_dict = dict(save_dict)
        self.generators = generators
        self.save_interval = save_interval
        self.resume = bool(resume)
        self.fingerprint = _canonical(fingerprint)
        self.random_states: list[np.random.RandomState] = []
        seen: set[int] = set()
        for obj in randomizables or []:
            _find_random_states(obj, self.random_states, seen)
        self._last_iteration: int | None = None  # of the state last saved or restored: not written twice
        self._optional: set[str] = set()  # objects added at attach, which an older state may lack

    def attach(self, engine: Engine) -> None:
        """Resume when ``engine`` starts; save every ``save_interval`` epochs and when it completes.

        Args:
            engine: the trainer.
        """
        scaler = getattr(engine, "scaler", None)  # MONAI's trainers hold a GradScaler when amp is on
        if scaler is not None and "grad_scaler" not in self.save_dict:
            self.save_dict["grad_scaler"] = scaler
            self._optional.add("grad_scaler")
        engine.add_event_handler(Events.STARTED, self.restore)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    # ------------------------------------------------------------------------------------------------ saving

    def random_state(self) -> dict[str, Any]:
        """This process's random states, in forms that ``torch.load(..., weights_only=True)`` accepts."""
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(np.random.get_state(legacy=True)),
            "python": random.getstate(),
            "generators": [generator.get_state() for generator in self.generators],
            "randomizables": [_numpy_state(r.get_state(legacy=True)) for r in self.random_states],
        }
        if torch.cuda.is_available():
            state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
        return state

    def state_dict(self) -> dict[str, Any]:
        """The whole state as saved, with this process's random states (one entry per rank when distributed)."""
        rank, world_size = _distributed()
        random_states = [self.random_state()]
        if world_size > 1:
            gathered: list[Any] = [None] * world_size
            dist.all_gather_object(gathered, random_states[0])
            random_states = gathered
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "objects": {name: obj.state_dict() for name, obj in self.save_dict.items()},
            "random": random_states,
        }

    def save(self, engine: Engine) -> None:
        """Write the state atomically onto :attr:`path` (rank 0 of a distributed run)."""
        if self._last_iteration == engine.state.iteration:
            return  # saved at this epoch's end already, or restored as it is
        state = self.state_dict()  # on every rank: it gathers the ranks' random states
        self._last_iteration = engine.state.iteration
        if _distributed()[0] != 0:
            return
        with atomic_path(self.path, overwrite=True) as tmp:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        logger.debug(f"saved the training state at epoch {engine.state.epoch} to {str(self.path)!r}")

    # --------------------------------------------------------------------------------------------- resuming

    def read(self) -> dict[str, Any]:
        """Read and check :attr:`path` (``weights_only``) without restoring anything.

        Raises:
            ValueError: when it cannot be read, is not a training state, or misses an object of ``save_dict``.
        """
        where = str(self.path)
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated zip, bad pickle, forbidden global: all the same to a caller
            raise ValueError(
                f"cannot read the training state {where!r} (truncated, corrupt, or holding more than tensors and "
                f"plain containers; it is read with weights_only=True): {type(error).__name__}: {error}. "
                "Remove it, or set resume to false to start afresh."
            ) from error
        if not isinstance(state, Mapping) or any(key not in state for key in _KEYS):
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"{where!r} is not a training state: expected the keys {list(_KEYS)}, got {keys}.")
        if state["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"the training state {where!r} has format version {state['format_version']!r}; "
                f"this version of monai_cfx reads version {FORMAT_VERSION}."
            )
        objects, random_states = state["objects"], state["random"]
        if not isinstance(objects, Mapping) or not isinstance(random_states, (list, tuple)) or not random_states:
            raise ValueError(f"{where!r} is not a training state: its 'objects' or 'random' entry is malformed.")
        missing = sorted(set(self.save_dict) - set(objects) - self._optional)
        if missing:
            raise ValueError(f"the training state {where!r} lacks {missing} (it holds {sorted(objects)}).")
        return dict(state)

    def check_fingerprint(self, state: Mapping[str, Any]) -> None:
        """Refuse a state saved under another fingerprint.

        Raises:
            ValueError: naming the file and the settings that differ.
        """
        saved = _canonical(state.get("fingerprint"), what=f"the fingerprint in {str(self.path)!r}")
        now = self.fingerprint
        differing = sorted(key for key in set(saved) | set(now) if saved.get(key) != now.get(key))
        if differing:
            details = ", ".join(f"{key}: {saved.get(key)!r} there, {now.get(key)!r} now" for key in differing)
            raise ValueError(
                f"the training state {str(self.path)!r} was saved by a run with other settings ({details}); "
                "resume with the same settings, or choose another training state path (or set resume to false)."
            )

    def restore(self, engine: Engine) -> None:
        """Restore the objects and random states from :attr:`path` when it exists and :attr:`resume` is set."""
        self._remove_stale_temporaries()
        if not self.resume:
            return
        if not self.path.is_file():
            logger.info(f"no training state at {str(self.path)!r}: training starts afresh")
            return
        state = self.read()
        self.check_fingerprint(state)
        random_state = self._own_random_state(state["random"])
        extra = sorted(set(state["objects"]) - set(self.save_dict))
        if extra:
            logger.warning(f"the training state {str(self.path)!r} also holds {extra}, which this run does not use")

        prior_max_epochs = engine.state.max_epochs
        prior_max_iters = getattr(engine.state, "max_iters", None)
        for name, obj in self.save_dict.items():
            if name not in state["objects"]:  # an optional object (the amp scaler) the saved run did not have
                logger.warning(f"the training state {str(self.path)!r} has no {name!r}: it starts afresh")
                continue
            try:
                obj.load_state_dict(state["objects"][name])
            except Exception as error:
                raise ValueError(
                    f"cannot restore {name!r} from the training state {str(self.path)!r}: {error}"
                ) from error
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(
                f"the training state {str(self.path)!r} is at epoch {engine.state.epoch}, beyond this run's "
                f"max_epochs ({prior_max_epochs}); raise max_epochs to train further."
            )
        engine.state.max_epochs = prior_max_epochs
        if hasattr(engine.state, "max_iters"):
            engine.state.max_iters = prior_max_iters
        if random_state is not None:
            self._restore_random(random_state)
        self._last_iteration = engine.state.iteration
        logger.info(
            f"resuming training from {str(self.path)!r}: epoch {engine.state.epoch}, "
            f"iteration {engine.state.iteration} (until epoch {engine.state.max_epochs})"
        )

    def _own_random_state(self, random_states: Sequence[Any]) -> Mapping[str, Any] | None:
        """This process's entry of the saved random states, checked; ``None`` when the number of processes differs.

        Raises:
            ValueError: when the entry is malformed or holds another number of generators or transform states.
        """
        where = str(self.path)
        rank, world_size = _distributed()
        if len(random_states) != world_size:
            logger.warning(
                f"the training state {where!r} holds the random states of {len(random_states)} processes, "
                f"this run has {world_size}: the random states are not restored, so the run continues "
                "reproducibly but not as the saved one would have"
            )
            return None
        state = random_states[rank]
        if not isinstance(state, Mapping) or any(key not in state for key in _RANDOM_KEYS):
            raise ValueError(f"{where!r} is not a training state: its random states lack {list(_RANDOM_KEYS)}.")
        counts = (len(state["generators"]), len(state["randomizables"]))
        if counts != (len(self.generators), len(self.random_states)):
            raise ValueError(
                f"the training state {where!r} holds {counts[0]} generator and {counts[1]} transform random states, "
                f"this run has {len(self.generators)} and {len(self.random_states)}."
            )
        return state

    def _restore_random(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in cuda])
            else:
                logger.warning(
                    f"the training state holds {len(cuda)} CUDA random states, this machine has "
                    f"{torch.cuda.device_count()} devices: CUDA's random states are not restored"
                )
        np.random.set_state(_numpy_tuple(state["numpy"]))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        for generator, saved in zip(self.generators, state["generators"]):
            generator.set_state(torch.as_tensor(saved, dtype=torch.uint8))
        for random_state, saved in zip(self.random_states, state["randomizables"]):
            random_state.set_state(_numpy_tuple(saved))

    def _remove_stale_temporaries(self) -> None:
        """Remove the temporary files that a run killed while saving left beside :attr:`path`."""
        if _distributed()[0] != 0 or not self.path.parent.is_dir():
            return
        prefix, suffix = f".{self.path.name}.", f".tmp{''.join(self.path.suffixes)}"
        for stale in self.path.parent.iterdir():
            if stale.name.startswith(prefix) and stale.name.endswith(suffix) and stale.is_file():
                logger.info(f"removing {str(stale)!r}, left by a run killed while saving its training state")
                stale.unlink(missing_ok=True)


class BestMetricState:
    """What a MONAI workflow (an evaluator) remembers between its runs, as an object with ``state_dict()`` and
    ``load_state_dict()`` for :class:`TrainingStateHandler`'s ``save_dict``: its best key metric and that metric's
    epoch, and the files its ``CheckpointSaver`` keeps by that metric (the saver's ignite ``Checkpoint`` state).

    Without it a resumed run's evaluator starts from no best metric, and its first validation replaces the kept
    best checkpoint whatever its score.

    Args:
        evaluator: a MONAI ``Workflow`` with a ``key_val_metric`` (``state.best_metric``, ``state.best_metric_epoch``).
        checkpoint_saver: its ``CheckpointSaver`` with ``save_key_metric=True``, or None.
    """

    def __init__(self, evaluator: Any, checkpoint_saver: Any = None) -> None:
        self.evaluator = evaluator
        self.checkpoint = None if checkpoint_saver is None else checkpoint_saver._key_metric_checkpoint
        if checkpoint_saver is not None and self.checkpoint is None:
            raise ValueError("`checkpoint_saver` keeps no checkpoint by a key metric (save_key_metric=False).")

    def state_dict(self) -> dict[str, Any]:
        state = self.evaluator.state
        saved = (
            [] if self.checkpoint is None else [[float(p), str(f)] for p, f in self.checkpoint.state_dict()["_saved"]]
        )
        return {
            "best_metric": float(state.best_metric),
            "best_metric_epoch": int(state.best_metric_epoch),
            "saved": saved,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
        if self.checkpoint is not None:
            self.checkpoint.load_state_dict({"_saved": [(float(p), str(f)) for p, f in state["saved"]]})


class SeededRunHandler:
    """Every run of an engine (a validation) draws the same random numbers, and leaves the caller's as they were.

    At ``STARTED`` the global random states (torch's CPU and CUDA generators, numpy's, Python's) are saved and
    seeded with ``seed``; at ``COMPLETED`` (or when the run raises) they are restored. A validation loss that draws
    noise, timesteps or posterior samples is then measured on the same draws at every epoch, so epochs compare, and
    attaching the validation does not change the training run's random numbers (nor its weights).

    Args:
        seed: the seed of every run.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._saved: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.COMPLETED, self.restore)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.restore)

    def start(self, engine: Engine | None = None) -> None:
        self._saved = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            self._saved["cuda"] = torch.cuda.get_rng_state_all()
        torch.manual_seed(self.seed)  # seeds CUDA's generators too
        np.random.seed(self.seed % 2**32)
        random.seed(self.seed)

    def restore(self, engine: Engine | None = None, *args: Any) -> None:
        if self._saved is None:
            return
        torch.set_rng_state(self._saved["torch"])
        if "cuda" in self._saved:
            torch.cuda.set_rng_state_all(self._saved["cuda"])
        np.random.set_state(self._saved["numpy"])
        random.setstate(self._saved["python"])
        self._saved = None


class ParamSchedulerState:
    """Where an ignite parameter scheduler is in its schedule (its ``event_index``), as an object with
    ``state_dict()`` and ``load_state_dict()`` for :class:`TrainingStateHandler`'s ``save_dict``.

    Schedulers count their own events, not the engine's iterations, so a resumed run would otherwise restart the
    schedule: an ``EMAHandler``'s momentum warmup (``ema.momentum_scheduler``) would begin again. The scheduler's
    own ``state_dict`` also holds its function, which a ``weights_only`` checkpoint cannot hold.

    Args:
        scheduler: an ignite ``BaseParamScheduler`` (e.g. ``EMAHandler.momentum_scheduler``), or None (no schedule:
            nothing is saved).
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return {"event_index": None if self.scheduler is None else int(self.scheduler.event_index)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.scheduler is not None and state["event_index"] is not None:
            self.scheduler.event_index = int(state["event_index"])
