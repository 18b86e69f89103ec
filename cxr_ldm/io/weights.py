"""Reading and writing weight files: safetensors (single or sharded), pickle only when trusted."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


class PickleRefusedError(ValueError):
    """A component folder holds only a pickle weight file and pickles were not allowed.

    The message says how to allow it in `allow_hint`, the words of the entry point the user called; an entry
    point that is not Python re-raises `err.with_hint("--allow-pickle")` in its own words.

    Attributes:
      path: the pickle file.
      allow_hint: how to allow it, e.g. "allow_pickle=True" (Python) or "--allow-pickle" (a CLI).
    """

    def __init__(self, path: str | os.PathLike, allow_hint: str = "allow_pickle=True"):
        self.path, self.allow_hint = Path(path), allow_hint
        super().__init__(f"{self.path.parent} holds only the pickle file {self.path.name}; pickles can run code "
                         f"when loaded. Pass {allow_hint} only for a file you trust, or convert it to safetensors.")

    def with_hint(self, allow_hint: str) -> "PickleRefusedError":
        """The same refusal, saying how to allow it in `allow_hint`."""
        return PickleRefusedError(self.path, allow_hint)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays (bfloat16 via ml_dtypes)."""
    try:  # framework="flax" understands bfloat16, which plain numpy does not.
        with safe_open(str(path), framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    except Exception as err:  # safetensors raises several error types for corrupt headers
        raise ValueError(f"cannot read safetensors file {path}: {err}") from err


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header ({} if it has none)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises several error types for corrupt headers
        raise ValueError(f"cannot read safetensors file {path}: {err}") from err


def read_pickle(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a PyTorch pickle (its "state_dict" entry if it has one), floats as float32."""
    import torch  # only for legacy files the user declared trusted

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def read_weights(folder: str | os.PathLike, stem: str, *, variant: str | None = None,
                 allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads the tensors of one component folder.

    Looks, in order, for `{stem}[.{variant}].safetensors`, its sharded index
    `{stem}.safetensors.index[.{variant}].json`, any single `*.safetensors`, and (only with
    `allow_pickle=True`) `{stem}.bin` / `pytorch_model.bin`.

    Args:
      folder: the component folder (e.g. `.../unet`).
      stem: the weight file stem the library uses ("diffusion_pytorch_model" or "model").
    Returns:
      key -> numpy array in the file's dtype (bfloat16 arrays use ml_dtypes).
    Raises:
      PickleRefusedError: the folder holds only a pickle and `allow_pickle` is False.
    """
    folder = Path(folder)
    name = f"{stem}.{variant}" if variant else stem
    # diffusers / transformers put the variant before the last suffix: "model.safetensors.index.fp16.json".
    index_name = f"{stem}.safetensors.index.{variant}.json" if variant else f"{stem}.safetensors.index.json"
    single, index = folder / f"{name}.safetensors", folder / index_name
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{index} names shard {shard}, which is missing from {folder}")
            state.update(read_safetensors(folder / shard))
        return state
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1 and not variant:
        return read_safetensors(others[0])
    pickles = [p for p in (folder / f"{name}.bin", folder / "pytorch_model.bin") if p.is_file()]
    if pickles and allow_pickle:
        return read_pickle(pickles[0])
    if pickles:
        raise PickleRefusedError(pickles[0])
    raise FileNotFoundError(f"no weights in {folder}: expected {single.name} or {index.name}"
                            + (f"; found several .safetensors files: {[p.name for p in others]}" if others else ""))


def read_tensor_file(path: Path, convert_hint: str) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors or .npz file (never unpickled); another suffix raises ValueError that ends
    with `convert_hint` (how to convert such a file)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    raise ValueError(f"{path}: expected a .safetensors or .npz file; {convert_hint}")


def write_json(path: str | os.PathLike, obj: Mapping) -> None:
    """Writes JSON atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_safetensors(path: str | os.PathLike, state: Mapping[str, np.ndarray]) -> None:
    """Writes a PyTorch-layout state dict as safetensors atomically, with the mode open() gives a new file
    (0o666 less the umask: 0644 under the usual 022), so that a shared model folder is readable by its group
    and others as its config.json is."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(dict(state), str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its file 0600
    os.replace(tmp, path)


def _umask() -> int:
    """The process umask (reading it means setting it; it is set back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
