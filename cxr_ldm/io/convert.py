"""Strict conversion between PyTorch state dicts (diffusers / transformers key layout) and Flax params.

Flax modules in `cxr_ldm.models` are named after the PyTorch modules they mirror, so a PyTorch key
maps to a Flax path mechanically:

    "down_blocks.0.resnets.1.conv1.weight"  <->  ("down_blocks_0", "resnets_1", "conv1", "kernel")

A numeric key part joins the name before it with "_". The leaf "weight" becomes "kernel" (Dense and
Conv: transposed to Flax layout), "scale" (LayerNorm / GroupNorm) or "embedding" (nn.Embed), chosen by
what the Flax module declares. Every missing, unexpected and mis-shaped tensor is reported by name.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

# Flax names that end in "_<digits>" but are literal PyTorch names, not list indices.
LITERAL_NAMES = frozenset({"linear_1", "linear_2"})
_LIST_ITEM = re.compile(r"^(.*)_(\d+)$")


class ConversionError(ValueError):
    """Raised when a state dict does not match the module it is loaded into."""


def torch_to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """PyTorch tensor layout -> Flax layout for a leaf named `leaf` ("kernel", "scale", ...)."""
    if leaf == "kernel" and array.ndim == 4:  # (O, I, kh, kw) -> (kh, kw, I, O)
        return np.transpose(array, (2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:  # (out, in) -> (in, out)
        return array.T
    return array


def flax_to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Inverse of `torch_to_flax_layout`."""
    if leaf == "kernel" and array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def _torch_key_to_flax_parent(key: str) -> tuple[tuple[str, ...], str]:
    """"a.b.0.c.weight" -> (("a", "b_0", "c"), "weight")."""
    parts = key.split(".")
    path: list[str] = []
    for part in parts[:-1]:
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path), parts[-1]


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    """("a", "b_0", "c", "kernel") -> "a.b.0.c.weight"."""
    parts = []
    for name in path[:-1]:
        match = _LIST_ITEM.match(name)
        if match and name not in LITERAL_NAMES:
            parts.extend(match.groups())
        else:
            parts.append(name)
    leaf = path[-1]
    parts.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
    return ".".join(parts)


def state_dict_to_params(
    state_dict: Mapping[str, np.ndarray],
    abstract_params: Any,
    *,
    ignore: Iterable[str] = (),
    dtype: Any = np.float32,
    source: str = "state dict",
) -> dict:
    """Converts a PyTorch-layout state dict into a Flax params tree shaped like `abstract_params`.

    Args:
      state_dict: key -> array, in the diffusers/transformers layout (already renamed if needed).
      abstract_params: a params tree (arrays or `jax.ShapeDtypeStruct`) giving every expected leaf.
      ignore: regular expressions of keys that may be present without a Flax counterpart (buffers).
      dtype: dtype of the returned leaves.
      source: the file or folder the tensors came from, named in errors.

    Raises:
      ConversionError listing every missing, unexpected and mis-shaped tensor.
    """
    expected = traverse_util.flatten_dict(abstract_params)
    parents: dict[tuple[str, ...], set[str]] = {}
    for path in expected:
        parents.setdefault(path[:-1], set()).add(path[-1])
    ignore_res = [re.compile(p) for p in ignore]

    params, seen, unexpected, misshaped = {}, set(), [], []
    for key, value in state_dict.items():
        parent, leaf = _torch_key_to_flax_parent(key)
        leaves = parents.get(parent, set())
        if leaf == "weight":
            leaf = next((n for n in ("kernel", "scale", "embedding") if n in leaves), "weight")
        path = parent + (leaf,)
        if path not in expected:
            if not any(r.fullmatch(key) for r in ignore_res):
                unexpected.append(key)
            continue
        seen.add(path)
        array = torch_to_flax_layout(np.asarray(value), leaf)
        want = tuple(expected[path].shape)
        if array.shape != want:
            misshaped.append(f"{key}: file has {tuple(np.shape(value))}, model expects {want} (Flax layout)")
            continue
        params[path] = array.astype(dtype)
    missing = [flax_path_to_torch_key(p) for p in expected if p not in seen]
    if missing or unexpected or misshaped:
        lines = [f"cannot load {source}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title} tensor(s):")
                lines.extend(f"    {item}" for item in sorted(items))
        raise ConversionError("\n".join(lines))
    return traverse_util.unflatten_dict(params)


def params_to_state_dict(params: Any, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Flax params -> PyTorch-layout state dict (contiguous numpy arrays)."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        array = flax_to_torch_layout(np.asarray(value, dtype=dtype), path[-1])
        out[flax_path_to_torch_key(path)] = np.ascontiguousarray(array)
    return out


def rename_keys(state_dict: Mapping[str, Any], rules: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Applies (regex, replacement) rules to every key, in order."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in compiled:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out

