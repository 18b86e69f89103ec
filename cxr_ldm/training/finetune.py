"""What the LDM stage trains: the split of {"unet", "text_encoder", "vae"} params into trained and frozen.

Modes (the comparisons of the CXR Stable Diffusion fine-tuning work, plus LoRA):
  "unet"               trainable {"unet"}; frozen {"text_encoder", "vae"}
  "unet+text_encoder"  trainable {"unet", "text_encoder"}; frozen {"vae"}
  "text_encoder"       trainable {"text_encoder"}; frozen {"unet", "vae"}
  "textual_inversion"  trainable {"new_token_embeddings": (n, D)}, rows appended to the text encoder's
                       token embedding ("embeddings", "token_embedding", "embedding"); all else frozen
  "lora"               trainable {"unet_lora": ..., ["text_encoder_lora": ...]}: for each attention
                       projection kernel W (in, out), A (in, r) and B (r, out); the model runs with
                       W + (alpha / r) A @ B; all original params frozen
With `train_token_embedding=False` the full modes that train the text encoder keep its token embedding
table frozen (frozen {"text_encoder_token_embedding": (vocab, D)}): for a text encoder trained from
scratch the table's rows are almost all unused, yet AdamW and the EMA would read and write all of it
at every step (49408 x D floats, most of a small model's step). With `trained_token_ids` only those rows
of it train (trainable {"text_encoder": {..., "embeddings": {"token_embedding": {"trained_rows": (k, D)}}}},
the full table frozen): the rows of the tokens the training prompts hold update exactly as with the whole
table trained, and AdamW and the EMA touch k rows instead of the vocabulary (rows no prompt reaches get
zero gradients, so whole-table training only shrinks them by weight decay).
A BERT text encoder with a projection to the UNet's width (`models.text_projection.ProjectedTextEncoder`,
text encoder params {"bert", "projection"}) keeps its projection trainable where the mode leaves the text
encoder frozen ("unet", "lora": trainable {..., "text_projection": ...}): the projection starts random.
`merge_params` rebuilds the full params the models run with (and that are exported); `save_adapter` writes
what "lora" and "textual_inversion" train as the files diffusers, PEFT and `Pipeline` load onto the base model.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cxr_ldm.io import adapters
from cxr_ldm.io.run_folder import write_folder_atomically

FINETUNE_MODES = ("unet", "unet+text_encoder", "text_encoder", "textual_inversion", "lora")
COMPONENTS = ("unet", "text_encoder", "vae")
TOKEN_EMBEDDING_PATH = adapters.TOKEN_EMBEDDING_PATH
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_FULL_MODES = {"unet": ("unet",), "unet+text_encoder": ("unet", "text_encoder"), "text_encoder": ("text_encoder",)}
FROZEN_TOKEN_TABLE = "text_encoder_token_embedding"
TEXT_PROJECTION = "text_projection"


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """mode: one of FINETUNE_MODES. lora_rank, lora_alpha: LoRA r and alpha (scale alpha / r).
    lora_text_encoder: also adapt the text encoder's attention projections in "lora" mode.
    train_token_embedding: False keeps the token embedding table frozen where the text encoder is
    trained in full ("unet+text_encoder", "text_encoder"); the other modes do not train it anyway.
    trained_token_ids: with train_token_embedding, the ids of the table's rows that train (ascending, e.g.
    `cxr_ldm.data.input_pipeline.corpus_token_ids`); None: every row.
    token_embedding_path: where the token table is in the text encoder's params (CLIP's by default)."""

    mode: str = "unet"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_text_encoder: bool = False
    train_token_embedding: bool = True
    trained_token_ids: tuple[int, ...] | None = None
    token_embedding_path: tuple[str, ...] = TOKEN_EMBEDDING_PATH

    def __post_init__(self):
        if self.mode not in FINETUNE_MODES:
            raise ValueError(f"finetune mode = {self.mode!r}: expected one of {FINETUNE_MODES}")
        if self.lora_rank < 1:
            raise ValueError(f"finetune lora_rank = {self.lora_rank}: expected >= 1")
        ids = self.trained_token_ids
        if ids is not None and (not ids or list(ids) != sorted(set(ids)) or ids[0] < 0):
            raise ValueError(f"finetune trained_token_ids: expected distinct ascending ids >= 0, got "
                             f"{len(ids)} ids starting {list(ids[:5])}")

    @property
    def trains_token_table(self) -> bool:
        """Whether the text encoder's token table trains (full text-encoder modes, not frozen)."""
        return trains_text_encoder(self.mode) and self.train_token_embedding

    @property
    def trains_token_rows(self) -> bool:
        """Whether only the `trained_token_ids` rows of the token table train."""
        return self.trains_token_table and self.trained_token_ids is not None

    @property
    def trained_rows_path(self) -> tuple[str, ...]:
        """Where the trained rows of the token table are in the trainable text encoder's params."""
        return self.token_embedding_path[:-1] + ("trained_rows",)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank


def trains_text_encoder(mode: str) -> bool:
    """Whether finetune `mode` trains the whole text encoder ("unet+text_encoder", "text_encoder")."""
    return "text_encoder" in _FULL_MODES.get(mode, ())


def split_params(config: FinetuneConfig, params: dict, *, rng: jax.Array | None = None,
                 init_token_ids: Sequence[int] | None = None) -> tuple[dict, dict]:
    """(trainable, frozen) from the full params {"unet": ..., "text_encoder": ..., "vae": ...}.

    rng: initialises LoRA A (normal, std 1 / r; B starts at zero so the model is unchanged).
    init_token_ids: textual inversion: one existing token id per new token, whose embedding row starts it.
    """
    missing = [c for c in COMPONENTS if c not in params]
    if missing:
        raise ValueError(f"params for fine-tuning: missing components {missing}; expected keys {COMPONENTS}")
    params = dict(params)
    if not trains_text_encoder(config.mode) and "projection" in params["text_encoder"]:
        projection = params["text_encoder"]["projection"]
        params["text_encoder"] = tree_without(params["text_encoder"], ("projection",))
        trainable, frozen = split_params(config, params, rng=rng, init_token_ids=init_token_ids)
        return {**trainable, TEXT_PROJECTION: projection}, frozen
    if config.mode in _FULL_MODES:
        trained = _FULL_MODES[config.mode]
        trainable = {c: params[c] for c in trained}
        frozen = {c: params[c] for c in COMPONENTS if c not in trained}
        if "text_encoder" in trained and (config.trains_token_rows or not config.train_token_embedding):
            table = tree_get(params["text_encoder"], config.token_embedding_path)
            frozen[FROZEN_TOKEN_TABLE] = table
            trainable["text_encoder"] = tree_without(params["text_encoder"], config.token_embedding_path)
            if config.trains_token_rows:
                ids = _checked_rows(config.trained_token_ids, table.shape[0])
                trainable["text_encoder"] = tree_set(trainable["text_encoder"], config.trained_rows_path,
                                                     jnp.asarray(table)[ids])
        return trainable, frozen
    if config.mode == "textual_inversion":
        if not init_token_ids:
            raise ValueError("finetune mode 'textual_inversion' needs init_token_ids (one per new token)")
        table = tree_get(params["text_encoder"], TOKEN_EMBEDDING_PATH)
        return {"new_token_embeddings": jnp.asarray(table)[np.asarray(init_token_ids)]}, params
    if rng is None:
        raise ValueError("finetune mode 'lora' needs rng to initialise the LoRA A matrices")
    unet_rng, text_rng = jax.random.split(rng)
    trainable = {"unet_lora": init_lora(params["unet"], UNET_LORA_TARGETS, config.lora_rank, unet_rng)}
    if config.lora_text_encoder:
        trainable["text_encoder_lora"] = init_lora(params["text_encoder"], TEXT_ENCODER_LORA_TARGETS,
                                                   config.lora_rank, text_rng)
    return trainable, params


def merge_params(config: FinetuneConfig, trainable: dict, frozen: dict) -> dict:
    """The full {"unet", "text_encoder", "vae"} params the models run with: trained and frozen parts
    joined, new token rows appended, LoRA merged (W + scale A @ B, float32). Differentiable."""
    if TEXT_PROJECTION in trainable:
        trainable = dict(trainable)
        projection = trainable.pop(TEXT_PROJECTION)
        params = merge_params(config, trainable, frozen)
        return {**params, "text_encoder": {**params["text_encoder"], "projection": projection}}
    if config.mode in _FULL_MODES:
        params = {**frozen, **trainable}
        if FROZEN_TOKEN_TABLE in params:
            table, text = params.pop(FROZEN_TOKEN_TABLE), params["text_encoder"]
            if config.trains_token_rows:
                rows = tree_get(text, config.trained_rows_path)
                text = tree_without(text, config.trained_rows_path)
                table = jnp.asarray(table).at[np.asarray(config.trained_token_ids)].set(rows.astype(table.dtype))
            params["text_encoder"] = tree_set(text, config.token_embedding_path, table)
        return params
    params = dict(frozen)
    if config.mode == "textual_inversion":
        table = tree_get(frozen["text_encoder"], TOKEN_EMBEDDING_PATH)
        rows = trainable["new_token_embeddings"].astype(table.dtype)
        params["text_encoder"] = tree_set(frozen["text_encoder"], TOKEN_EMBEDDING_PATH,
                                      jnp.concatenate([table, rows], axis=0))
        return params
    params["unet"] = merge_lora(frozen["unet"], trainable["unet_lora"], config.lora_scale)
    if "text_encoder_lora" in trainable:
        params["text_encoder"] = merge_lora(frozen["text_encoder"], trainable["text_encoder_lora"],
                                            config.lora_scale)
    return params


def save_adapter(config: FinetuneConfig, trained: dict, folder: str, placeholder_tokens: Sequence[str] = ()) -> None:
    """Writes what a "lora" or "textual_inversion" run trained, alone, as files for the base model it started
    from; `folder` is replaced whole (never half-written). Other modes train no adapter: `folder` is removed
    if an earlier run left one.

    lora: pytorch_lora_weights.safetensors (diffusers' `load_lora_weights`, `Pipeline.load_lora_weights`) and
    unet/ (a PEFT adapter), the scale lora_alpha / lora_rank folded into lora_B (`io.adapters.save_lora`).
    textual_inversion: learned_embeds.safetensors {token: (1, D)} for one placeholder token, or
    learned_embeds_<i>.safetensors for the i-th of several (`io.adapters.save_embeddings`).

    Args:
      trained: the trainable params as `split_params` made them (or their EMA), on the host.
      placeholder_tokens: textual inversion: the new tokens, in the order of trained["new_token_embeddings"].
    """
    if config.mode == "lora":
        lora = {"unet": adapters.lora_from_factors(trained["unet_lora"], config.lora_scale)}
        if "text_encoder_lora" in trained:
            lora["text_encoder"] = adapters.lora_from_factors(trained["text_encoder_lora"], config.lora_scale)
        write_folder_atomically(folder, lambda tmp: adapters.save_lora(tmp, lora))
    elif config.mode == "textual_inversion":
        rows = np.asarray(trained["new_token_embeddings"], np.float32)
        if len(placeholder_tokens) != len(rows):
            raise ValueError(f"{len(placeholder_tokens)} placeholder tokens for {len(rows)} trained embeddings")
        write_folder_atomically(folder, lambda tmp: adapters.save_embeddings(tmp, dict(zip(placeholder_tokens, rows))))
    else:
        shutil.rmtree(folder, ignore_errors=True)


def init_lora(params: dict, targets: Sequence[str], rank: int, rng: jax.Array) -> dict:
    """LoRA factors for every Dense kernel (in, out) under a module named in `targets`, as a nested dict
    mirroring the module paths: {..., "to_q": {"lora_A": (in, r), "lora_B": (r, out)}}.
    A ~ normal(0, 1 / r) (peft's "gaussian" init that diffusers' LoRA scripts use), B = 0."""
    kernels = _lora_kernel_paths(params, targets)
    if not kernels:
        raise ValueError(f"LoRA: no 2-D kernel under modules named {tuple(targets)} in the params")
    lora: dict = {}
    for index, (path, kernel) in enumerate(kernels):
        a = jax.random.normal(jax.random.fold_in(rng, index), (kernel.shape[0], rank), jnp.float32) / rank
        lora = tree_set(lora, path[:-1], {"lora_A": a, "lora_B": jnp.zeros((rank, kernel.shape[1]), jnp.float32)})
    return lora


def merge_lora(params: dict, lora: dict, scale: float) -> dict:
    """params with kernel W of each LoRA'd module replaced by W + scale * A @ B (float32)."""
    merged = params
    for path, factors in _lora_factor_paths(lora):
        kernel = tree_get(params, path + ("kernel",))
        delta = scale * (factors["lora_A"] @ factors["lora_B"])
        merged = tree_set(merged, path + ("kernel",), kernel.astype(jnp.float32) + delta)
    return merged


def add_placeholder_tokens(tokenizer, placeholder_tokens: Sequence[str],
                           initializer_tokens: Sequence[str]) -> tuple[list[int], list[int]]:
    """Adds textual-inversion placeholder tokens to a transformers CLIPTokenizer (in place).

    Each initializer must be a single existing token (e.g. "effusion" -> one BPE id). Returns
    (new token ids, initializer token ids); the new ids are len(tokenizer) before the call onwards, the
    rows `merge_params` appends to the embedding table (whose original vocab must be that length).
    """
    if len(placeholder_tokens) != len(initializer_tokens):
        raise ValueError(f"{len(placeholder_tokens)} placeholder tokens but {len(initializer_tokens)} "
                         "initializer tokens: expected one initializer per placeholder")
    init_ids = []
    for word in initializer_tokens:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"initializer token {word!r} is {len(ids)} tokens {ids}: expected exactly one")
        init_ids.append(ids[0])
    first_new = len(tokenizer)
    if tokenizer.add_tokens(list(placeholder_tokens)) != len(placeholder_tokens):
        raise ValueError(f"placeholder tokens {list(placeholder_tokens)}: some are already in the tokenizer")
    new_ids = tokenizer.convert_tokens_to_ids(list(placeholder_tokens))
    if new_ids != list(range(first_new, first_new + len(placeholder_tokens))):
        raise ValueError(f"placeholder token ids {new_ids}: expected consecutive ids from {first_new}")
    return new_ids, init_ids


def with_vocab_size(text_encoder, vocab_size: int):
    """The text encoder module with its config's vocab_size changed (for appended token rows)."""
    return text_encoder.clone(config=dataclasses.replace(text_encoder.config, vocab_size=vocab_size))


def trainable_summary(trainable: Any) -> dict[str, int]:
    """Number of trained parameters per top-level key (for logs)."""
    return {key: int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(value)))
            for key, value in trainable.items()}


def _lora_kernel_paths(params: dict, targets: Sequence[str]) -> list[tuple[tuple[str, ...], Any]]:
    pattern = re.compile(rf"(^|/)({'|'.join(map(re.escape, targets))})/kernel$")
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(str(k.key) for k in path)
        if pattern.search("/".join(keys)) and np.ndim(leaf) == 2:
            found.append((keys, leaf))
    return found


def _lora_factor_paths(lora: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    if "lora_A" in lora:
        return [(prefix, lora)]
    return [item for key, sub in lora.items() for item in _lora_factor_paths(sub, prefix + (key,))]


def _checked_rows(ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """`ids` as an index array, or a ValueError if one lies outside the token table."""
    if ids[-1] >= vocab_size:
        raise ValueError(f"finetune trained_token_ids: id {ids[-1]} is outside the text encoder's token "
                         f"table of {vocab_size} rows (a different tokenizer?)")
    return np.asarray(ids)


def tree_get(tree: Mapping, path: Sequence[str]) -> Any:
    """The entry of nested dict `tree` at `path` (KeyError naming the missing path)."""
    for depth, key in enumerate(path):
        if not isinstance(tree, Mapping) or key not in tree:
            raise KeyError(f"params: no entry {'/'.join(path[: depth + 1])!r}")
        tree = tree[key]
    return tree


def tree_without(tree: Mapping, path: Sequence[str]) -> dict:
    """A copy of nested dict `tree` without the entry at `path`; dicts left empty are dropped too."""
    tree_get(tree, path)  # KeyError naming the path if it is absent
    tree = dict(tree)
    if len(path) == 1:
        del tree[path[0]]
    else:
        rest = tree_without(tree[path[0]], path[1:])
        if rest:
            tree[path[0]] = rest
        else:
            del tree[path[0]]
    return tree


def tree_set(tree: dict, path: Sequence[str], value: Any) -> dict:
    """A copy of nested dict `tree` with `value` at `path` (intermediate dicts created/copied)."""
    tree = dict(tree)
    if len(path) == 1:
        tree[path[0]] = value
    else:
        tree[path[0]] = tree_set(tree.get(path[0], {}), path[1:], value)
    return tree
