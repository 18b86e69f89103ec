"""Orbax checkpoints of a TrainState and the input pipeline position, with exact resume.

Layout of a checkpoint directory:
  steps/<step>/state   trainable params, optimizer state, EMA, step, rng, non-finite counters
  steps/<step>/meta    JSON: the run config given to the Checkpointer and the frozen params' signature
  steps/<step>/data    the Grain iterator state (one JSON file per process), when an iterator is given
  frozen/              the frozen params, written once (`save_frozen`) when they cannot be reloaded
                       from their source (e.g. a VAE trained by this run); pretrained frozen weights
                       are not copied into every checkpoint.
Saves are asynchronous (the device-to-host copy happens before `save` returns, so the next step may
donate the state) and atomic; only the last `max_to_keep` steps are kept.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Any, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cxr_ldm.json_config import differences
from cxr_ldm.training.sharding import path_to_str
from cxr_ldm.training.state import TrainState


class Checkpointer:
    """Saves and restores TrainStates under `directory` (see module docstring).

    save_interval_steps: `save` writes when step % save_interval_steps == 0 (or force=True).
    config: JSON-serialisable settings that must not change on resume (model, fine-tune mode, ...);
      `restore` raises if the checkpoint was written with different values, naming each differing leaf
      of the nested settings (`json_config.differences`).
    """

    def __init__(self, directory: str, *, save_interval_steps: int = 1000, max_to_keep: int = 3,
                 async_save: bool = True, config: Mapping[str, Any] | None = None):
        self.directory = os.path.abspath(directory)
        self.save_interval_steps = save_interval_steps
        self.config = None if config is None else json.loads(json.dumps(dict(config)))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler()}
        self._manager = ocp.CheckpointManager(os.path.join(self.directory, "steps"), options=options,
                                              item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, data_iterator: Any = None, *, force: bool = False) -> bool:
        """Saves `state` as checkpoint `step` if the interval says so (or `force`); returns whether it did.
        data_iterator: a Grain DataLoader / dataset iterator whose position is saved with the state."""
        if not force and step % self.save_interval_steps:
            return False
        items = {"state": ocp.args.StandardSave(_saved_fields(state)),
                 "meta": ocp.args.JsonSave({"config": self.config, "frozen": _signature(state.frozen)})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, target: TrainState, data_iterator: Any = None, step: int | None = None) -> TrainState:
        """The checkpointed state (latest step by default) in the shardings of `target`.

        target: a state of the same run (e.g. from `init_train_state`), concrete or abstract
          (jax.ShapeDtypeStruct leaves with shardings); its `frozen` params are kept as they are and
          checked against the checkpoint's signature.
        data_iterator: restored in place to the saved position (the checkpoint must hold one).
        Raises ValueError naming the item and leaf when config, shapes or dtypes differ.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}/steps")
        where = f"checkpoint {self.directory}/steps/{step}"
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        self._check_config(meta.get("config"), where)
        _check_signature(meta.get("frozen", {}), _signature(target.frozen), f"{where} item 'frozen'")
        abstract = jax.tree_util.tree_map(_abstract, _saved_fields(target))
        stored = self._manager.item_metadata(step)["state"]
        _check_signature(_signature(stored.tree), _signature(abstract), f"{where} item 'state'")
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            if not os.path.isdir(os.path.join(self.directory, "steps", str(step), "data")):
                raise ValueError(f"{where} has no 'data' item (input pipeline state) to restore")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))["state"]
        return target.replace(**restored)

    def save_frozen(self, frozen: Any) -> None:
        """Writes the frozen params once to <directory>/frozen (synchronously); no-op if present."""
        if not self.has_frozen():
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(os.path.join(self.directory, "frozen"), frozen)
            checkpointer.wait_until_finished()

    def has_frozen(self) -> bool:
        return os.path.isdir(os.path.join(self.directory, "frozen"))

    def restore_frozen(self, target: Any) -> Any:
        """The frozen params written by `save_frozen`, in the shapes and shardings of `target`."""
        abstract = jax.tree_util.tree_map(_abstract, target)
        path = os.path.join(self.directory, "frozen")
        checkpointer = ocp.StandardCheckpointer()
        _check_signature(_signature(checkpointer.metadata(path).item_metadata.tree), _signature(abstract),
                         f"checkpoint {path}")
        return checkpointer.restore(path, abstract)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_config(self, stored: Mapping | None, where: str) -> None:
        if self.config is None or stored is None or stored == self.config:
            return
        details = "; ".join(differences(stored, self.config))
        raise ValueError(f"{where} was written with a different config ({details}); use another workdir "
                         "or the original config")


class StopSignal:
    """The stop request of a preemption (SIGTERM on spot / preemptible VMs), polled at every step.

    One process: a Python SIGTERM handler sets a flag that `requested()` reads (no device or network work).
    Several processes (jax.distributed): JAX's preemption service catches SIGTERM on any process and agrees
    on a call at which all of them stop; `requested()` asks it (`multihost_utils.reached_preemption_sync_point`
    with the count of its own calls), so every process must call it at the same points of the run. Once
    True, it stays True. As a context manager it restores the previous SIGTERM handler on exit.
    """

    def __init__(self):
        self._multihost = jax.process_count() > 1
        self._flag = False
        self._calls = 0
        self._installed = not self._multihost
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self._flag = True

    def requested(self) -> bool:
        if self._multihost and not self._flag:
            self._calls += 1
            self._flag = multihost_utils.reached_preemption_sync_point(self._calls)
        return self._flag

    def uninstall(self) -> None:
        """Restores the SIGTERM handler that was installed before."""
        if self._installed:
            # None: the handler was not set from Python (it cannot be restored); the default is the closest
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()


def _saved_fields(state: TrainState) -> dict:
    """The state's fields without the frozen params (and without the EMA when there is none)."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "frozen"}
    if fields["ema"] is None:
        del fields["ema"]
    return fields


def _abstract(leaf) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)


def _signature(tree: Any) -> dict[str, list]:
    """{"a/b/c": [shape, dtype name]} of every leaf (arrays, ShapeDtypeStructs or Orbax metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_to_str(path): [list(leaf.shape), np.dtype(leaf.dtype).name] for path, leaf in leaves}


def _check_signature(stored: Mapping[str, list], expected: Mapping[str, list], where: str) -> None:
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        raise ValueError(f"{where} does not match this run: leaves missing from the checkpoint "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}, leaves only in the checkpoint "
                         f"{extra[:5]}{'...' if len(extra) > 5 else ''}")
    for path, (shape, dtype) in expected.items():
        if list(stored[path]) != [shape, dtype]:
            raise ValueError(f"{where}: {path} is {stored[path][1]}{tuple(stored[path][0])} in the checkpoint, "
                             f"this run expects {dtype}{tuple(shape)}")
