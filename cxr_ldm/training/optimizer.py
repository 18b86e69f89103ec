"""AdamW with warmup + cosine decay and global-norm clipping, gradient accumulation, EMA of parameters."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings (torch.optim.AdamW's meanings, as diffusers' training scripts use them).

    learning_rate: peak learning rate, reached linearly from 0 after `warmup_steps` optimizer updates.
    schedule: "cosine" decays from the peak to `end_learning_rate` at `total_steps`; "constant" holds it.
    weight_decay: decoupled weight decay applied to every trainable leaf.
    clip_norm: global gradient-norm clipping threshold; None = no clipping.
    """

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "cosine"
    total_steps: int = 10_000
    end_learning_rate: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    clip_norm: float | None = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer schedule = {self.schedule!r}: expected one of {SCHEDULES}")
        if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"optimizer total_steps = {self.total_steps}: expected more than warmup_steps "
                             f"= {self.warmup_steps} for the cosine schedule")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the number of optimizer updates already applied."""
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps,
                                                  config.total_steps, config.end_learning_rate)
    if config.warmup_steps == 0:
        return optax.constant_schedule(config.learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
                                 optax.constant_schedule(config.learning_rate)], [config.warmup_steps])


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping (if set) followed by AdamW on the schedule of `config`."""
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay)
    if config.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)


def per_key_optimizer(optimizers: Mapping[str, optax.GradientTransformation]) -> optax.GradientTransformation:
    """One optimizer per top-level key of the trainable dict (e.g. {"vae": ..., "discriminator": ...}):
    each key is clipped and scheduled on its own. Its state's `inner_states[key]` is that key's state."""
    return optax.multi_transform(dict(optimizers), lambda params: {key: key for key in params})


class DelayedStartState(NamedTuple):
    count: jax.Array
    inner_state: Any


def delayed_start(inner: optax.GradientTransformation, start_step: int) -> optax.GradientTransformation:
    """`inner` from its `start_step`-th call on; before that, zero updates and `inner`'s state untouched
    (so weight decay and Adam's bias correction start with the first real update). For a GAN
    discriminator that joins training after a warm-up."""
    def init(params):
        return DelayedStartState(jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        new_updates, new_inner = inner.update(updates, state.inner_state, params)
        active = state.count >= start_step
        select = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, old)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, updates)
        return select(new_updates, zeros), DelayedStartState(state.count + 1, select(new_inner, state.inner_state))
    return optax.GradientTransformation(init, update)


def ema_decay(num_updates: jnp.ndarray, max_decay: float, warmup: bool = True) -> jnp.ndarray:
    """The EMA decay after `num_updates` optimizer updates (this one included), as diffusers' EMAModel
    (update_after_step=0, use_ema_warmup=False): 0 for the first update (the EMA starts as a copy),
    then min(max_decay, (1 + s) / (10 + s)) with s = num_updates - 1 when `warmup`, else max_decay."""
    s = jnp.asarray(num_updates, jnp.float32) - 1.0
    decay = jnp.minimum(max_decay, (1.0 + s) / (10.0 + s)) if warmup else jnp.float32(max_decay)
    return jnp.where(s <= 0, 0.0, decay)


def ema_update(ema: Any, params: Any, decay: jnp.ndarray) -> Any:
    """ema <- ema - (1 - decay) * (ema - params), leaf by leaf (dtype of `ema`)."""
    return jax.tree_util.tree_map(lambda e, p: (e - (1.0 - decay) * (e - p.astype(e.dtype))).astype(e.dtype),
                                  ema, params)


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
    """(B, ...) leaves -> (num_microbatches, B / num_microbatches, ...); microbatch i holds the examples
    i, i + k, i + 2k, ... so that every device keeps its rows (no data moves across devices)."""
    def one(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(f"batch of {x.shape[0]} examples: expected a multiple of the "
                             f"{num_microbatches} gradient-accumulation microbatches")
        return jnp.swapaxes(x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:]), 0, 1)
    return jax.tree_util.tree_map(one, batch)


def accumulated_value_and_grad(loss_fn: Callable[..., tuple[jnp.ndarray, Any]], num_microbatches: int,
                               microbatch_sharding: Any = None) -> Callable:
    """value_and_grad(loss_fn, has_aux=True) averaged over microbatches of the batch.

    loss_fn(params, batch, rng, *args) -> (scalar loss, aux pytree of scalars). The returned function has
    the same signature and returns ((mean loss, mean aux), mean grads). With num_microbatches > 1 it runs
    a lax.scan over `split_microbatches(batch)`, microbatch i with rng fold_in(rng, i); `args` are passed
    to every microbatch unchanged. microbatch_sharding: optional sharding constraint for microbatch leaves.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        return grad_fn

    def accumulated(params, batch, rng, *args):
        def body(carry, index_and_micro):
            index, micro = index_and_micro
            if microbatch_sharding is not None:
                micro = jax.lax.with_sharding_constraint(micro, microbatch_sharding)
            out = grad_fn(params, micro, jax.random.fold_in(rng, index), *args)
            return jax.tree_util.tree_map(jnp.add, carry, out), None

        micro = split_microbatches(batch, num_microbatches)
        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                       jax.eval_shape(grad_fn, params, first, rng, *args))
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_microbatches), micro))
        return jax.tree_util.tree_map(lambda x: x / num_microbatches, total)
    return accumulated
