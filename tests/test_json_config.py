"""JsonConfig: the from_dict / to_dict round trip shared by the configs written as config.json."""
import dataclasses
import json
import warnings

import numpy as np
import pytest

from cxr_ldm.diffusion.schedules import SchedulerConfig
from cxr_ldm.evaluation.classifier import TrainConfig
from cxr_ldm.json_config import JsonConfig, differences, flatten
from cxr_ldm.models.autoencoder import AutoencoderConfig
from cxr_ldm.models.text_encoder import CLIPTextConfig
from cxr_ldm.models.unet import UNetConfig


@dataclasses.dataclass(frozen=True)
class Toy(JsonConfig):
    _source = "toy config"
    _ignored_keys = frozenset({"_note"})

    size: int = 1
    shape: tuple = (2, 3)
    name: str | None = None

    def __post_init__(self):
        if self.size < 1:  # a str size raises TypeError here
            raise ValueError(f"size={self.size}: expected a positive integer")


@dataclasses.dataclass(frozen=True)
class StrictToy(JsonConfig):
    _unknown_keys = "raise"
    _unknown_keys_message = "{source}: unknown keys {keys}; expected some of {expected}"

    size: int = 1


@dataclasses.dataclass(frozen=True)
class HookedToy(JsonConfig):
    size: int = 1

    @classmethod
    def _read_key(cls, key, value, source):
        if key != "mode":
            return False
        if value != "fixed":
            raise ValueError(f"{source}: mode={value!r}, expected 'fixed'")
        return True

    @classmethod
    def _prepare(cls, values, d, source):
        if d.get("loud"):
            warnings.warn(f"{source}: loud is not applied", stacklevel=4)
        return {k: v for k, v in values.items() if v is not None}


def via_json(config: JsonConfig) -> dict:
    return json.loads(json.dumps(config.to_dict()))


def test_toy_round_trip_lists_and_tuples():
    config = Toy(size=3, shape=((1, 2), 3), name="x")
    d = via_json(config)
    assert d == {"size": 3, "shape": [[1, 2], 3], "name": "x"}
    assert Toy.from_dict({"shape": [4, 5]}).shape == (4, 5)
    assert Toy.from_dict({**d, "shape": [1, 2]}) == Toy(size=3, shape=(1, 2), name="x")


def test_toy_unknown_ignored_and_errors_name_the_source():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Toy.from_dict({"_note": "hi", "size": 2}) == Toy(size=2)
    with pytest.warns(UserWarning, match=r"^toy config: unknown keys \['a', 'b'\] are ignored$"):
        Toy.from_dict({"b": 1, "a": 2})
    with pytest.warns(UserWarning, match=r"^t\.json: unknown keys \['a'\]"):
        Toy.from_dict({"a": 2}, "t.json")
    with pytest.raises(ValueError, match=r"^t\.json: size=0: expected a positive integer$"):
        Toy.from_dict({"size": 0}, source="t.json")
    with pytest.raises(ValueError, match=r"^t\.json: .*'<'"):  # the TypeError of the constructor
        Toy.from_dict({"size": "big"}, source="t.json")
    with pytest.raises(ValueError, match=r"^toy config: expected a JSON object, got list$"):
        Toy.from_dict([("size", 1)])


def test_strict_and_hooked_toys():
    with pytest.raises(ValueError, match=r"^config: unknown keys \['big'\]; expected some of \['size'\]$"):
        StrictToy.from_dict({"big": 1})
    assert HookedToy.from_dict({"mode": "fixed", "size": None}) == HookedToy()
    with pytest.raises(ValueError, match=r"^h: mode='free'"):
        HookedToy.from_dict({"mode": "free"}, source="h")
    with pytest.warns(UserWarning) as record:
        HookedToy.from_dict({"loud": True})
    assert [str(w.message) for w in record] == ["config: unknown keys ['loud'] are ignored",
                                                 "config: loud is not applied"]
    assert [w.filename for w in record] == [__file__, __file__]  # both name this caller of from_dict


def test_unknown_key_policy_is_checked():
    with pytest.raises(TypeError, match="_unknown_keys"):
        class Bad(JsonConfig):
            _unknown_keys = "ignore"


def test_from_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"size": 4, "shape": [1]}))
    assert Toy.from_file(path) == Toy(size=4, shape=(1,))
    path.write_text(json.dumps({"size": 0}))
    with pytest.raises(ValueError, match=r"config\.json: size=0"):
        Toy.from_file(path)
    path.write_text("{oops")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        Toy.from_file(path)


CONFIGS = {
    "autoencoder": AutoencoderConfig(
        in_channels=1, out_channels=1, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=(64, 48), shift_factor=0.1,
        latents_mean=(0.0, 0.5, 1.0, 1.5), latents_std=(1.0,) * 4, use_quant_conv=False),
    "unet": UNetConfig(
        sample_size=(16, 24), block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=(1, 2), attention_head_dim=(4, 2), use_linear_projection=True,
        addition_embed_type="text", addition_embed_type_num_heads=8),
    "text_encoder": CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                   num_attention_heads=4, hidden_act="gelu", bos_token_id=998, eos_token_id=999),
    "scheduler": SchedulerConfig(num_train_timesteps=10, trained_betas=tuple(np.linspace(0.01, 0.2, 10).tolist()),
                                 prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False),
    "classifier": TrainConfig(input_size=32, widths=(8, 16), feature_dim=32, norm="group", epochs=4),
}
TUPLE_FIELDS = {"autoencoder": ("sample_size", "block_out_channels", "latents_mean"),
                "unet": ("sample_size", "layers_per_block", "attention_head_dim"),
                "text_encoder": (), "scheduler": ("trained_betas",), "classifier": ("widths",)}
BAD_VALUES = {"autoencoder": {"latent_channels": 0}, "unet": {"act_fn": "gelu"},
              "text_encoder": {"hidden_act": "relu"}, "scheduler": {"beta_schedule": "sigmoid"}}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_through_json(name):
    config = CONFIGS[name]
    d = via_json(config)
    for key in TUPLE_FIELDS[name]:
        assert isinstance(config.to_dict()[key], list), key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = type(config).from_dict(d)
    assert again == config
    for key in TUPLE_FIELDS[name]:
        assert isinstance(getattr(again, key), tuple), key
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - {"classifier"}))
def test_unknown_keys_warn_naming_the_source(name):
    config = CONFIGS[name]
    with pytest.warns(UserWarning, match=r"my/config\.json: .*'frobnicate'") as record:
        again = type(config).from_dict({**config.to_dict(), "frobnicate": 1}, source="my/config.json")
    assert again == config
    assert [w.filename for w in record] == [__file__]


def test_classifier_config_refuses_unknown_keys():
    d = {**CONFIGS["classifier"].to_dict(), "frobnicate": 1}
    with pytest.raises(ValueError, match=r"^classifier config: unknown keys \['frobnicate'\]; expected some of"):
        TrainConfig.from_dict(d)
    with pytest.raises(ValueError, match=r"^classifier\.json: unknown keys"):
        TrainConfig.from_dict(d, source="classifier.json")


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_bad_values_raise_naming_the_source(name):
    config = CONFIGS[name]
    key = next(iter(BAD_VALUES[name]))
    with pytest.raises(ValueError, match=rf"^my/config\.json: .*{key}"):
        type(config).from_dict({**config.to_dict(), **BAD_VALUES[name]}, source="my/config.json")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_non_mappings_raise_naming_the_source(name):
    with pytest.raises(ValueError, match=r"^x\.json: expected a JSON object, got list"):
        type(CONFIGS[name]).from_dict([], source="x.json")


def test_class_specific_keys():
    with pytest.raises(ValueError, match=r"^u: dropout=0\.1 is not supported"):
        UNetConfig.from_dict({"dropout": 0.1}, "u")
    assert UNetConfig.from_dict({"only_cross_attention": [False] * 4}) == UNetConfig()
    written = UNetConfig(num_attention_heads=(4, 2, 2, 1), attention_head_dim=8).to_dict()
    assert (written["attention_head_dim"], written["num_attention_heads"]) == ([4, 2, 2, 1], None)

    text = CONFIGS["text_encoder"].to_dict()
    assert (text["model_type"], text["attention_dropout"]) == ("clip_text_model", 0.0)
    assert CLIPTextConfig.from_dict({"hidden_size": None}) == CLIPTextConfig()  # null: the default
    with pytest.raises(ValueError, match=r"^t: model_type='clip_vision_model'"):
        CLIPTextConfig.from_dict({"model_type": "clip_vision_model"}, "t")
    with pytest.warns(UserWarning, match=r"^t: attention_dropout=0\.1 is not applied") as record:
        CLIPTextConfig.from_dict({"attention_dropout": 0.1}, "t")
    assert [w.filename for w in record] == [__file__]

    with pytest.raises(TypeError):  # source is keyword-only there
        SchedulerConfig.from_dict({}, "s")
    assert SchedulerConfig.from_dict({"_class_name": "PNDMScheduler"}).set_alpha_to_one is False
    assert SchedulerConfig.from_dict({"variance_type": None}).variance_type == "fixed_small"
    with pytest.raises(ValueError, match=r"^s: 'thresholding': true"):
        SchedulerConfig.from_dict({"thresholding": True}, source="s")
    with pytest.warns(UserWarning, match=r"^s: solver_order=3 is ignored") as record:
        SchedulerConfig.from_dict({"solver_order": 3}, source="s")
    assert [w.filename for w in record] == [__file__]
    with pytest.raises(ValueError, match=r"^s: 'trained_betas' must be a list"):
        SchedulerConfig.from_dict({"trained_betas": "0.1"}, source="s")


def test_differences_name_each_differing_leaf_as_a_config_file_writes_it():
    old = {"unet": {"block_out_channels": [32, 32], "layers": 1}, "finetune": "unet", "gone": 1}
    new = {"unet": {"block_out_channels": [64, 64], "layers": 1}, "finetune": "lora", "added": [[1, 2]]}
    assert flatten(old) == {"unet.block_out_channels": [32, 32], "unet.layers": 1, "finetune": "unet", "gone": 1}
    assert differences(old, new) == ["added absent -> ((1, 2),)", "finetune 'unet' -> 'lora'", "gone 1 -> absent",
                                     "unet.block_out_channels (32, 32) -> (64, 64)"]
    assert differences(old, old) == []
