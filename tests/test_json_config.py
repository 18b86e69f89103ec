"""JsonConfig: the from_dict / to_dict round trip shared by the configs written as config.json."""
import dataclasses
import json
import warnings

import pytest

from cxr_ldm.json_config import JsonConfig


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

