"""The train state: trained and frozen parameters kept apart, so frozen ones get no optimizer state."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from cxr_ldm.training import sharding as sharding_lib


@struct.dataclass
class TrainState:
    """Everything a train step reads and writes; a pytree (jit argument, Orbax item).

    step: int32 scalar, batches consumed so far (skipped non-finite updates included).
    trainable: pytree of the parameters the optimizer updates (see finetune.split_params).
    frozen: pytree of the parameters the step reads but never changes.
    opt_state: optax state of `trainable` only.
    ema: exponential moving average of `trainable` (float32), or None.
    rng: uint32 (2,) base key; step s draws from jax.random.fold_in(rng, s).
    nonfinite_count: int32 scalar, updates skipped because the loss or a gradient was NaN/Inf.
    nonfinite_streak: int32 scalar, such skips in a row up to and including the last step.
    """

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    ema: Any
    rng: jax.Array
    nonfinite_count: jax.Array
    nonfinite_streak: jax.Array


def create_train_state(trainable: Any, frozen: Any, optimizer: optax.GradientTransformation, rng: jax.Array,
                       *, use_ema: bool = False) -> TrainState:
    """A state at step 0. rng: a raw uint32 (2,) key (jax.random.PRNGKey(seed)). Jittable."""
    ema = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), trainable) if use_ema else None
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=optimizer.init(trainable), ema=ema, rng=jnp.asarray(rng, jnp.uint32),
                      nonfinite_count=jnp.zeros((), jnp.int32), nonfinite_streak=jnp.zeros((), jnp.int32))


def train_state_shardings(abstract_state: TrainState, mesh: Mesh,
                          rules: sharding_lib.PartitionRules = sharding_lib.DEFAULT_RULES,
                          min_fsdp_size: int = sharding_lib.DEFAULT_MIN_FSDP_SIZE) -> TrainState:
    """NamedShardings of every leaf of a (possibly abstract, jax.eval_shape) state by partition rules;
    optimizer moments get the sharding of their parameter (same shape, same rule on the path suffix)."""
    return sharding_lib.tree_shardings(abstract_state, mesh, rules, min_fsdp_size)


def init_train_state(trainable: Any, frozen: Any, optimizer: optax.GradientTransformation, rng: jax.Array,
                     mesh: Mesh, *, use_ema: bool = False,
                     rules: sharding_lib.PartitionRules = sharding_lib.DEFAULT_RULES,
                     min_fsdp_size: int = sharding_lib.DEFAULT_MIN_FSDP_SIZE) -> tuple[TrainState, TrainState]:
    """Builds the step-0 state directly in its shardings (optimizer state is created on the devices).

    trainable, frozen: host (numpy) or device pytrees, the same on every process. Returns
    (state, state_shardings); pass state_shardings to the step builders and to the checkpointer.
    """
    def create(trainable, frozen, rng):
        return create_train_state(trainable, frozen, optimizer, rng, use_ema=use_ema)

    abstract = jax.eval_shape(create, trainable, frozen, rng)
    shardings = train_state_shardings(abstract, mesh, rules, min_fsdp_size)
    inputs = sharding_lib.place((trainable, frozen, jnp.asarray(rng, jnp.uint32)),
                                (shardings.trainable, shardings.frozen, shardings.rng))
    state = jax.jit(create, out_shardings=shardings, donate_argnums=(0, 1))(*inputs)
    return state, shardings
