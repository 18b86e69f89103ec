"""LoRA and textual-inversion files in the formats diffusers, PEFT and kohya-ss use, to and from Flax params.

LoRA (every tensor in PyTorch layout; down (r, in) or (r, in, kh, kw), up (out, r) or (out, r, 1, 1);
a layer changes the weight W (out, in[, kh, kw]) by scale * up @ down):
  pytorch_lora_weights.safetensors   diffusers (`StableDiffusionPipeline.load_lora_weights` / `save_lora_weights`):
                                     "unet.<module>.lora_A.weight" (down), "unet.<module>.lora_B.weight" (up),
                                     "text_encoder.text_model.<module>.lora_A.weight", ... (diffusers' training
                                     scripts write "<module>.lora.down.weight" / ".lora.up.weight" for the UNet's
                                     attention and ".lora_linear_layer.down.weight" for the text encoder); the scale is
                                     lora_alpha / r of the PEFT LoraConfig that the safetensors header's
                                     "lora_adapter_metadata" (JSON, "unet.lora_alpha", "unet.alpha_pattern", ...)
                                     holds, and 1 (alpha = r) without it
  adapter_config.json +              PEFT (`PeftModel.from_pretrained(model, folder)`), one model per folder:
  adapter_model.safetensors          "base_model.model.<module>.lora_A.weight", ...; the scale from the config
  kohya-ss (A1111, ComfyUI)          "lora_unet_<module, "." written "_">.lora_down.weight", ".lora_up.weight",
                                     ".alpha" (scale alpha / r, 1 without it); "lora_te_text_model_<module>..."
Module keys are the PyTorch module names of diffusers' UNet2DConditionModel and of transformers' CLIPTextModel
without its "text_model." prefix ("encoder.layers.0.self_attn.q_proj"); kohya-ss keys keep their underscores
until `merge_lora` matches them against the model's modules.

Textual inversion: learned_embeds.safetensors holds one token's vectors, {token: (n, D)} (diffusers' training
script; a token of n > 1 vectors is the n tokens token, token_1, ..., token_{n-1}) or {"emb_params": (n, D)}
(A1111 / kohya-ss, whose token the user names).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Mapping

import numpy as np
from flax import traverse_util

from cxr_ldm.io import convert
from cxr_ldm.io.weights import read_safetensors, read_safetensors_metadata, write_json, write_safetensors

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
EMBEDDINGS_NAME = "learned_embeds.safetensors"
LORA_COMPONENTS = ("unet", "text_encoder")
TOKEN_EMBEDDING_PATH = ("embeddings", "token_embedding", "embedding")  # of the Flax CLIP text encoder

_TEXT_MODEL = "text_model."  # transformers < 5 and every Stable Diffusion file prefix CLIP's modules with it
_METADATA_KEY = "lora_adapter_metadata"
_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^(.+)\.lora_([AB])\.weight$")
# The key spellings of diffusers' `convert_state_dict_to_diffusers` (what its LoRA training scripts save) -> PEFT's.
_DIFFUSERS_TO_PEFT = ((".lora.down.weight", ".lora_A.weight"), (".lora.up.weight", ".lora_B.weight"),
                      (".lora_linear_layer.down.weight", ".lora_A.weight"),
                      (".lora_linear_layer.up.weight", ".lora_B.weight"))
_KOHYA_KEY = re.compile(r"^lora_(unet|te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# Key fragments of adapters that are not a plain LoRA, and what they are.
_OTHER_ADAPTERS = {"hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", "lora_mid": "LyCORIS LoCon with a mid factor",
                   "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "lora_B.bias": "LoRA with a bias"}
_SDXL_KEYS = ("lora_te1_", "lora_te2_", "text_encoder_2.")


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One adapted layer, PyTorch layout: W (out, in[, kh, kw]) += scale * up @ down.

    Attributes:
      down: (r, in) for a Linear, (r, in, kh, kw) for a Conv2d (PEFT's lora_A, kohya-ss' lora_down).
      up: (out, r) or (out, r, 1, 1) (lora_B, lora_up).
      scale: alpha / r (alpha / sqrt(r) for PEFT's rsLoRA).
    """

    down: np.ndarray
    up: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> np.ndarray:
        """scale * up @ down, float32, shaped like the weight (out, in[, kh, kw])."""
        up = self.up.astype(np.float32).reshape(self.up.shape[:2])
        return self.scale * np.tensordot(up, self.down.astype(np.float32), axes=1)


Lora = dict[str, dict[str, LoraLayer]]  # {"unet" | "text_encoder": {module key: layer}}


def lora_from_factors(factors: Mapping, scale: float) -> dict[str, LoraLayer]:
    """Flax LoRA factors -> {module key: LoraLayer}.

    Args:
      factors: nested dicts mirroring the Flax module paths of a model's Dense layers, each leaf module
        {"lora_A": (in, r), "lora_B": (r, out)} (`training.finetune.init_lora`'s layout).
      scale: the factor of A @ B in the merged kernel W (in, out) + scale * A @ B.
    """
    flat = traverse_util.flatten_dict(factors)
    return {convert.flax_path_to_torch_key(path[:-1] + ("kernel",)).removesuffix(".weight"):
            LoraLayer(np.asarray(a, np.float32).T, np.asarray(flat[path[:-1] + ("lora_B",)], np.float32).T, scale)
            for path, a in flat.items() if path[-1] == "lora_A"}


def save_lora(folder: str | Path, lora: Lora) -> None:
    """Writes `lora` into `folder`: pytorch_lora_weights.safetensors (diffusers' `load_lora_weights`, our
    `Pipeline.load_lora_weights`) and, for the UNet, a PEFT adapter in unet/ (adapter_config.json,
    adapter_model.safetensors). Each layer's scale is folded into its up factor and the files state alpha = r,
    so that every loader, whether it reads alpha or assumes alpha = r, merges the same weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for component, layers in lora.items():
        if component not in LORA_COMPONENTS:
            raise ValueError(f"LoRA component {component!r}: expected one of {LORA_COMPONENTS}")
        state.update(_peft_state(layers, f"{component}.{_TEXT_MODEL if component == 'text_encoder' else ''}"))
    write_safetensors(folder / LORA_WEIGHTS_NAME, state)
    if lora.get("unet"):
        (folder / "unet").mkdir(exist_ok=True)
        write_safetensors(folder / "unet" / PEFT_WEIGHTS_NAME, _peft_state(lora["unet"], _PEFT_PREFIX))
        write_json(folder / "unet" / PEFT_CONFIG_NAME, _peft_config(lora["unet"]))


def read_lora(path: str | Path) -> Lora:
    """Reads a LoRA in diffusers', PEFT's or kohya-ss' format (see the module docstring).

    Args:
      path: a .safetensors file, or a folder holding pytorch_lora_weights.safetensors, a PEFT adapter
        (adapter_config.json + adapter_model.safetensors) or a single .safetensors file.
    Returns:
      {"unet": {...}, "text_encoder": {...}} (components the file adapts), module key -> LoraLayer.
    Raises:
      ValueError naming the file and the format when it is not a plain SD 1.x / 2.x LoRA (LyCORIS, DoRA, SDXL,
      pickles, unknown key layouts).
    """
    file = _lora_file(Path(path))
    state = read_safetensors(file)
    for fragment, kind in _OTHER_ADAPTERS.items():
        if any(fragment in key for key in state):
            raise ValueError(f"{file} is a {kind} adapter ({fragment!r} keys), not a plain LoRA; only LoRA loads")
    if any(key.startswith(_SDXL_KEYS) for key in state):
        raise ValueError(f"{file} adapts two text encoders (SDXL keys {_SDXL_KEYS}); only SD 1.x / 2.x LoRAs load")
    if not state:
        raise ValueError(f"{file} holds no tensors")
    if all(_KOHYA_KEY.match(key) for key in state):
        return _read_kohya(state, file)
    if all(key.startswith(_PEFT_PREFIX) for key in state):
        return _read_peft(state, file)
    if all(key.startswith(tuple(c + "." for c in LORA_COMPONENTS)) for key in state):
        return _read_diffusers(state, file)
    raise ValueError(
        f"{file}: unknown LoRA key layout (e.g. {sorted(state)[:3]}); expected diffusers' "
        "'unet.<module>.lora_A.weight' / 'text_encoder.<module>.lora_A.weight', PEFT's "
        "'base_model.model.<module>.lora_A.weight' or kohya-ss' 'lora_unet_<module>.lora_down.weight'. Files of "
        "diffusers before 0.21 ('...processor.to_q_lora.down.weight') load in diffusers; save them again there")


def merge_lora(params: Mapping, layers: Mapping[str, LoraLayer], scale: float = 1.0, *,
               source: str = "LoRA") -> dict:
    """`params` with each adapted kernel W replaced by W + scale * layer.delta() (Flax layout, computed in float32,
    stored in W's dtype).

    Args:
      params: Flax params of the UNet or of the CLIP text encoder.
      layers: module key (dotted, or kohya-ss' with underscores) -> LoraLayer.
      scale: the LoRA strength (diffusers' `lora_scale` / `fuse_lora(lora_scale=...)`).
      source: the file, named in errors.
    Raises:
      ValueError listing every module the params lack and every layer whose shape differs from its weight.
    """
    flat = traverse_util.flatten_dict(params)
    kernels = {}
    for path in flat:
        if path[-1] == "kernel":
            key = convert.flax_path_to_torch_key(path).removesuffix(".weight")
            kernels[key] = kernels[key.replace(".", "_")] = path
    unknown, misshaped = [], []
    for name, layer in layers.items():
        if name not in kernels:
            unknown.append(name)
            continue
        kernel = np.asarray(flat[kernels[name]])
        delta = convert.torch_to_flax_layout(layer.delta(), "kernel")
        if delta.shape != kernel.shape:
            misshaped.append(f"{name}: the LoRA makes {delta.shape}, the model's kernel is {kernel.shape} "
                             "(Flax layout)")
            continue
        flat[kernels[name]] = (kernel.astype(np.float32) + scale * delta).astype(kernel.dtype)
    if unknown or misshaped:
        lines = [f"cannot merge {source}:"]
        if unknown:
            sgm = any(word in name for name in unknown for word in ("input_blocks", "middle_block", "output_blocks"))
            lines.append(f"  {len(unknown)} module(s) the model lacks" + (
                " (LDM / SGM module names, as kohya-ss writes SDXL LoRAs: not supported)" if sgm else "") + ":")
            lines.extend(f"    {name}" for name in sorted(unknown))
        if misshaped:
            lines.append(f"  {len(misshaped)} mis-shaped layer(s):")
            lines.extend(f"    {item}" for item in sorted(misshaped))
        raise ValueError("\n".join(lines))
    return traverse_util.unflatten_dict(flat)


def save_embeddings(folder: str | Path, embeddings: Mapping[str, np.ndarray]) -> list[Path]:
    """Writes textual-inversion embeddings as diffusers' training script does, {token: (1, D)} per file:
    folder/learned_embeds.safetensors for one token, learned_embeds_<i>.safetensors (i = 0, 1, ... in the
    order given) for several (diffusers: `load_textual_inversion(folder, weight_name=...)`, or a list of files).

    Args:
      embeddings: token -> its vector (D,) or (1, D).
    Returns:
      the files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = ([EMBEDDINGS_NAME] if len(embeddings) == 1 else
             [f"{Path(EMBEDDINGS_NAME).stem}_{i}.safetensors" for i in range(len(embeddings))])
    for name, (token, vector) in zip(names, embeddings.items()):
        write_safetensors(folder / name, {token: np.asarray(vector, np.float32).reshape(1, -1)})
    return [folder / name for name in names]


def read_embeddings(path: str | Path, token: str | None = None) -> list[tuple[str, np.ndarray]]:
    """Reads textual-inversion embeddings (see the module docstring).

    Args:
      path: a .safetensors file, or a folder holding learned_embeds.safetensors or learned_embeds_<i>.safetensors.
      token: the token to use for a file's embedding (needed for the "emb_params" form; else it replaces the
        token the file names). Only for a single file.
    Returns:
      [(token, vectors (n, D) float32)], one entry per file.
    """
    path = Path(path)
    files = [path]
    if path.is_dir():
        files = [path / EMBEDDINGS_NAME] if (path / EMBEDDINGS_NAME).is_file() else sorted(
            path.glob(f"{Path(EMBEDDINGS_NAME).stem}_*.safetensors"), key=lambda f: int(f.stem.rsplit("_", 1)[1]))
        if not files:
            raise FileNotFoundError(f"{path} holds no {EMBEDDINGS_NAME} (nor learned_embeds_<i>.safetensors)")
    elif path.suffix != ".safetensors":
        raise ValueError(f"{path}: expected a .safetensors embedding; pickled .bin / .pt files are not read "
                         "(load it with torch and save its tensor with safetensors.torch.save_file if you trust it)")
    if token is not None and len(files) > 1:
        raise ValueError(f"token={token!r} names one embedding but {path} holds {len(files)} files")
    return [_read_embedding(file, token) for file in files]


def _read_embedding(file: Path, token: str | None) -> tuple[str, np.ndarray]:
    state = read_safetensors(file)
    if len(state) != 1:
        kind = " (SDXL: one per text encoder)" if set(state) == {"clip_l", "clip_g"} else ""
        raise ValueError(f"{file} holds {len(state)} tensors {sorted(state)}{kind}; expected one "
                         "({token: vectors} or {'emb_params': vectors})")
    (name, vectors), = state.items()
    if name == "emb_params" and token is None:
        raise ValueError(f"{file} is an A1111 / kohya-ss embedding ('emb_params'), which names no token: pass token=")
    vectors = np.asarray(vectors, np.float32)
    return token or name, vectors.reshape(1, -1) if vectors.ndim == 1 else vectors


def _lora_file(path: Path) -> Path:
    """The LoRA weight file at `path` (a file, or the one a folder holds)."""
    if path.is_dir():
        for name in (LORA_WEIGHTS_NAME, PEFT_WEIGHTS_NAME):
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise FileNotFoundError(f"{path} holds no {LORA_WEIGHTS_NAME} nor {PEFT_WEIGHTS_NAME}, and "
                                    f"{len(found)} other .safetensors files {[f.name for f in found]}: expected one")
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"LoRA {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: expected a .safetensors LoRA; pickled .bin / .pt / .ckpt files are not read "
                         "(convert it: safetensors.torch.save_file(torch.load(file), out) if you trust it)")
    return path


def _pairs(state: Mapping[str, np.ndarray], file: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PEFT-style keys "<module>.lora_A.weight" / ".lora_B.weight" -> {module: (down, up)}."""
    factors: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if not match:
            old = " (the layout of diffusers before 0.21: load it in diffusers and save it again there)" if (
                "_lora." in key or ".processor." in key) else ""
            raise ValueError(f"{file}: key {key!r} is not '<module>.lora_A.weight' or '<module>.lora_B.weight'{old}")
        factors[match[1]][match[2]] = value
    unpaired = sorted(module for module, f in factors.items() if len(f) != 2)
    if unpaired:
        raise ValueError(f"{file}: {len(unpaired)} module(s) lack lora_A or lora_B: {unpaired[:5]}")
    return {module: (f["A"], f["B"]) for module, f in factors.items()}


def _layer(down: np.ndarray, up: np.ndarray, scale: float, name: str, file: Path) -> LoraLayer:
    if down.ndim not in (2, 4) or up.shape[1] != down.shape[0] or up.shape[2:] not in ((), (1, 1)):
        raise ValueError(f"{file}: {name}: down {down.shape} and up {up.shape} are not a LoRA pair "
                         "(r, in[, kh, kw]) and (out, r[, 1, 1])")
    return LoraLayer(np.asarray(down, np.float32), np.asarray(up, np.float32), float(scale))


def _peft_scale(config: Mapping | None, module: str, rank: int) -> float:
    """The scale PEFT gives `module` under LoraConfig `config` (its alpha_pattern, lora_alpha, use_rslora; PEFT's
    defaults r = lora_alpha = 8); None (no config: diffusers then takes alpha = r): 1."""
    if config is None:
        return 1.0
    if config.get("use_dora"):
        raise ValueError("a DoRA adapter (use_dora) is not a plain LoRA; only LoRA loads")
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():  # PEFT's get_pattern_key
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _component_module(component: str, module: str) -> str:
    return module.removeprefix(_TEXT_MODEL) if component == "text_encoder" else module


def _read_diffusers(state: Mapping[str, np.ndarray], file: Path) -> Lora:
    metadata = read_safetensors_metadata(file).get(_METADATA_KEY)
    metadata = json.loads(metadata) if metadata else None
    lora: Lora = {}
    for component in LORA_COMPONENTS:
        prefix = component + "."
        pairs = _pairs({_peft_spelling(k.removeprefix(prefix)): v for k, v in state.items() if k.startswith(prefix)},
                       file)
        config = None if metadata is None else {
            k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
        if pairs:
            lora[component] = {_component_module(component, m): _layer(
                down, up, _peft_scale(config, m, down.shape[0]), prefix + m, file) for m, (down, up) in pairs.items()}
    return lora


def _peft_spelling(key: str) -> str:
    for old, new in _DIFFUSERS_TO_PEFT:
        if key.endswith(old):
            return key.removesuffix(old) + new
    return key


def _read_peft(state: Mapping[str, np.ndarray], file: Path) -> Lora:
    config_file = file.parent / PEFT_CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{file} has PEFT keys ('{_PEFT_PREFIX}...') but no {PEFT_CONFIG_NAME} beside it, "
                                "which holds its lora_alpha")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_file}: peft_type {config['peft_type']!r}; only LORA adapters load")
    pairs = _pairs({k.removeprefix(_PEFT_PREFIX): v for k, v in state.items()}, file)
    # One model per PEFT adapter: transformers' CLIPTextModel or diffusers' UNet.
    text = all(m.startswith((_TEXT_MODEL, "encoder.layers.")) for m in pairs)
    component = "text_encoder" if text else "unet"
    return {component: {_component_module(component, m): _layer(down, up, _peft_scale(config, m, down.shape[0]),
                                                                  m, file) for m, (down, up) in pairs.items()}}


def _read_kohya(state: Mapping[str, np.ndarray], file: Path) -> Lora:
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in state.items():
        kind, name, leaf = _KOHYA_KEY.match(key).groups()
        parts[("unet" if kind == "unet" else "text_encoder", name)][leaf] = value
    lora: Lora = {}
    for (component, name), leaves in parts.items():
        key = f"lora_{'unet' if component == 'unet' else 'te'}_{name}"
        if "lora_down.weight" not in leaves or "lora_up.weight" not in leaves:
            raise ValueError(f"{file}: kohya-ss LoRA module {key} lacks lora_down or lora_up")
        down, up = leaves["lora_down.weight"], leaves["lora_up.weight"]
        alpha = float(np.asarray(leaves["alpha"], np.float32)) if "alpha" in leaves else down.shape[0]
        module = name.removeprefix("text_model_") if component == "text_encoder" else name
        lora.setdefault(component, {})[module] = _layer(down, up, alpha / down.shape[0], key, file)
    return lora


def _peft_state(layers: Mapping[str, LoraLayer], prefix: str) -> dict[str, np.ndarray]:
    """PEFT-style tensors of `layers` under `prefix`, each layer's scale folded into lora_B."""
    state = {}
    for module, layer in layers.items():
        state[f"{prefix}{module}.lora_A.weight"] = np.ascontiguousarray(layer.down, np.float32)
        state[f"{prefix}{module}.lora_B.weight"] = np.ascontiguousarray(layer.scale * layer.up, np.float32)
    return state


def _peft_config(layers: Mapping[str, LoraLayer]) -> dict:
    """PEFT's adapter_config.json for `layers` whose scale is folded into lora_B: alpha = r for every module."""
    ranks = {module: layer.rank for module, layer in layers.items()}
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{module}": r for module, r in ranks.items() if r != rank}
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": pattern,
            "target_modules": sorted(layers), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True}
