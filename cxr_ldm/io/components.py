"""`load_component` / `save_component`: diffusers / transformers component folders <-> Flax.

A component folder holds `config.json` and safetensors weights, as `save_pretrained` writes them for
`UNet2DConditionModel`, `AutoencoderKL` (diffusers), `CLIPTextModel` and `BertModel` (transformers), and
`TextProjection` (ours: a BERT encoder's map to the UNet's width, written as diffusers writes a model).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from cxr_ldm.io import convert, weights


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """How one component class is stored and built.

    Attributes:
      class_name: the reference library's class name, as config.json names it.
      module_path / config_name / model_name: where the Flax config and module live.
      weights_stem: weight file stem of the reference library.
      library: "diffusers" or "transformers" (decides the config.json bookkeeping keys).
      ignore: regexes of state-dict keys without a Flax counterpart (buffers).
      key_rules: (regex, replacement) renames applied to file keys before conversion.
      prefix: key prefix of the Flax tree root in files: stripped on load where present, written on save.
    """

    class_name: str
    module_path: str
    config_name: str
    model_name: str
    weights_stem: str
    library: str
    ignore: tuple[str, ...] = ()
    key_rules: tuple[tuple[str, str], ...] = ()
    prefix: str = ""

    def classes(self) -> tuple[Any, Any]:
        mod = importlib.import_module(self.module_path)
        return getattr(mod, self.config_name), getattr(mod, self.model_name)

    def dummy_inputs(self, config) -> tuple:
        return importlib.import_module(self.module_path).dummy_inputs(config)


SPECS = {
    spec.class_name: spec
    for spec in (
        ComponentSpec("UNet2DConditionModel", "cxr_ldm.models.unet", "UNetConfig", "UNet2DConditionModel",
                      "diffusion_pytorch_model", "diffusers"),
        ComponentSpec(
            "AutoencoderKL", "cxr_ldm.models.autoencoder", "AutoencoderConfig", "AutoencoderKL",
            "diffusion_pytorch_model", "diffusers",
            # Checkpoints written before diffusers 0.14 name the mid-block attention differently.
            key_rules=((r"\.attentions\.0\.query\.", ".attentions.0.to_q."),
                       (r"\.attentions\.0\.key\.", ".attentions.0.to_k."),
                       (r"\.attentions\.0\.value\.", ".attentions.0.to_v."),
                       (r"\.attentions\.0\.proj_attn\.", ".attentions.0.to_out.0.")),
        ),
        # transformers < 5 and every Stable Diffusion checkpoint prefix the keys with "text_model."; transformers 5
        # writes them without and reads both.
        ComponentSpec("CLIPTextModel", "cxr_ldm.models.text_encoder", "CLIPTextConfig", "CLIPTextModel",
                      "model", "transformers", ignore=(r"embeddings\.position_ids",), prefix="text_model."),
        # Domain text encoders (CXR-BERT, PubMedBERT, RadBERT); older transformers saved the two buffers.
        ComponentSpec("BertModel", "cxr_ldm.models.bert", "BertConfig", "BertModel", "model", "transformers",
                      ignore=(r"embeddings\.position_ids", r"embeddings\.token_type_ids")),
        # The learned map from a BERT encoder's width to the UNet's cross_attention_dim.
        ComponentSpec("TextProjection", "cxr_ldm.models.text_projection", "TextProjectionConfig", "TextProjection",
                      "diffusion_pytorch_model", "diffusers"),
    )
}


def _class_name(config: dict, path: Path) -> str:
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if name is None and config.get("model_type") in ("clip_text_model", "clip"):
        name = "CLIPTextModel"
    if name is None and config.get("model_type") == "bert":
        name = "BertModel"
    if name not in SPECS:
        hint = ("; a BERT checkpoint with a task head loads once its encoder is saved alone: "
                "transformers.BertModel.from_pretrained(folder).save_pretrained(out)"
                if config.get("model_type") == "bert" else "")
        raise ValueError(f"{path}: component class {name!r} is not supported; expected one of {sorted(SPECS)}{hint}")
    return name


def _squeeze_1x1_linear(state: dict[str, np.ndarray], abstract: Any) -> dict[str, np.ndarray]:
    """Old VAE checkpoints store attention projections as 1x1 convs (O, I, 1, 1); Flax uses Dense."""
    flat = {convert.flax_path_to_torch_key(p): v for p, v in traverse_util.flatten_dict(abstract).items()}
    return {k: (v[:, :, 0, 0] if v.ndim == 4 and k in flat and len(flat[k].shape) == 2 else v)
            for k, v in state.items()}


def abstract_params(module, config, spec: ComponentSpec) -> Any:
    """Shapes and dtypes of the module's params, without allocating them."""
    inputs = spec.dummy_inputs(config)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]


def load_component(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = np.float32,
                   variant: str | None = None, allow_pickle: bool = False) -> tuple[Any, Any]:
    """Loads a diffusers/transformers component folder as `(module, params)`.

    Args:
      path: folder with `config.json` and `*.safetensors` (sharded index allowed).
      dtype: computation dtype of the returned module (None: float32).
      param_dtype: dtype the params are cast to.
      variant: weight variant, e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.
      allow_pickle: read a legacy `.bin` pickle; only for files you trust.
    Returns:
      (Flax module, params pytree of numpy arrays).
    Raises:
      weights.PickleRefusedError: the folder holds only a pickle and `allow_pickle` is False.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a component folder: {config_file} is missing")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    spec = SPECS[_class_name(raw, path)]
    config_cls, model_cls = spec.classes()
    config = config_cls.from_dict(raw, source=str(config_file))
    kwargs = {"dtype": dtype} if dtype is not None else {}
    module = model_cls(config=config, param_dtype=param_dtype, **kwargs)
    state = weights.read_weights(path, spec.weights_stem, variant=variant, allow_pickle=allow_pickle)
    state = {k.removeprefix(spec.prefix): v for k, v in state.items()}
    state = convert.rename_keys(state, spec.key_rules)
    abstract = abstract_params(module, config, spec)
    state = _squeeze_1x1_linear(state, abstract)
    params = convert.state_dict_to_params(state, abstract, ignore=spec.ignore, dtype=param_dtype,
                                          source=str(path))
    return module, params


def save_component(module, params, path: str | os.PathLike) -> None:
    """Writes `module` + `params` as a folder that diffusers / transformers `from_pretrained` loads."""
    spec = next((s for s in SPECS.values() if type(module).__name__ == s.model_name), None)
    if spec is None:
        raise TypeError(f"save_component: unsupported module type {type(module).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = module.config.to_dict()
    if spec.library == "diffusers":
        config = {"_class_name": spec.class_name, "_diffusers_version": "0.36.0", **config}
    else:
        config = {"architectures": [spec.class_name], **config}
    state = {spec.prefix + k: v for k, v in convert.params_to_state_dict(params).items()}
    weights.write_safetensors(path / f"{spec.weights_stem}.safetensors", state)
    weights.write_json(path / "config.json", config)
