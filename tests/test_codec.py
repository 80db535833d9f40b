"""The pickle-free codec: every kind of training state survives encode -> bytes -> decode bit for bit."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from torch import nn

from resilient_train.checkpoint import codec
from resilient_train.checkpoint import format as fmt
from resilient_train.errors import CheckpointError


def roundtrip(tree):
    """Encode to the bytes a checkpoint holds, then decode from those bytes alone."""
    structure, tensors = codec.encode(tree)
    json_bytes = codec.dumps_json(structure)
    tensor_bytes = codec.tensors_to_bytes(tensors)
    return codec.decode(
        codec.loads_json(json_bytes, "state.json"), codec.tensors_from_bytes(tensor_bytes, "state.safetensors")
    )


def assert_same(a, b, path="/"):
    """Deep equality that is exact for tensors (dtype, shape, bits) and for types (tuple vs list)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        assert torch.equal(a.cpu(), b.cpu()), f"{path}: values differ"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}{k!r}/")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}{i}/")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{path}: {b} is not nan"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _trained(optimizer_factory, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = optimizer_factory(model.parameters())
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


# -- optimizer, scheduler, scaler state dicts ----------------------------------------------------


def test_adamw_state_dict_round_trips_bit_for_bit():
    _, optimizer = _trained(lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1))
    state = optimizer.state_dict()
    # the shapes that make JSON hard: int keys, tuples, 0-dim step tensors
    assert all(isinstance(k, int) for k in state["state"])
    assert isinstance(state["param_groups"][0]["betas"], tuple)
    assert state["state"][0]["step"].dim() == 0
    restored = roundtrip(state)
    assert_same(state, restored)


def test_adamw_state_restored_from_codec_loads_into_a_fresh_optimizer():
    model, optimizer = _trained(lambda p: torch.optim.AdamW(p, lr=1e-3))
    restored = roundtrip(optimizer.state_dict())
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(restored)
    assert_same(optimizer.state_dict(), fresh.state_dict())


def test_sgd_with_momentum_state_dict_round_trips():
    _, optimizer = _trained(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True))
    state = optimizer.state_dict()
    assert "momentum_buffer" in state["state"][0]
    assert_same(state, roundtrip(state))


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.9**epoch),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=20),
    ],
    ids=["StepLR", "LambdaLR", "OneCycleLR"],
)
def test_lr_scheduler_state_dict_round_trips_and_loads(make_scheduler):
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = make_scheduler(optimizer)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    restored = roundtrip(state)
    assert_same(state, restored)
    fresh_opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1, momentum=0.9)
    fresh = make_scheduler(fresh_opt)
    fresh.load_state_dict(restored)
    assert fresh.last_epoch == scheduler.last_epoch
    assert fresh.get_last_lr() == scheduler.get_last_lr()


def _scaler_state():
    try:
        scaler = torch.amp.GradScaler("cpu")
    except Exception:  # pragma: no cover - older torch without a CPU scaler
        scaler = None
    if scaler is not None and scaler.is_enabled():
        model = nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler.scale(model(torch.randn(2, 3)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        state = scaler.state_dict()
        if state:
            return state
    return {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 1}


def test_grad_scaler_state_dict_round_trips():
    state = _scaler_state()
    assert "scale" in state
    assert_same(state, roundtrip(state))


# -- plain Python values -------------------------------------------------------------------------


def test_python_random_state_round_trips_and_is_usable():
    rng = random.Random(42)
    rng.random()
    state = rng.getstate()
    restored = roundtrip(state)
    assert_same(state, restored)
    other = random.Random()
    other.setstate(restored)
    assert [other.random() for _ in range(5)] == [rng.random() for _ in range(5)]


def test_non_finite_floats_round_trip():
    tree = {"inf": float("inf"), "ninf": float("-inf"), "nan": float("nan"), "neg_zero": -0.0, "tiny": 5e-324}
    restored = roundtrip(tree)
    assert_same(tree, restored)
    assert restored["inf"] == math.inf and restored["ninf"] == -math.inf
    assert math.copysign(1.0, restored["neg_zero"]) == -1.0


def test_json_has_no_nan_or_infinity_literals():
    structure, _ = codec.encode({"a": float("nan"), "b": [float("inf"), float("-inf")], "c": (float("nan"),)})
    data = codec.dumps_json(structure)
    for literal in (b"NaN", b"Infinity"):
        assert literal not in data
    json.loads(data, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))


def test_dumps_json_refuses_raw_non_finite_floats():
    with pytest.raises(ValueError):
        codec.dumps_json({"x": float("nan")})


def test_bytes_and_bytearray_round_trip_as_bytes():
    tree = {"b": bytes(range(256)), "empty": b"", "ba": bytearray(b"\x00\xff")}
    restored = roundtrip(tree)
    assert restored["b"] == bytes(range(256))
    assert restored["empty"] == b""
    assert restored["ba"] == b"\x00\xff"


def test_nested_tuples_and_lists_keep_their_types():
    tree = {"t": (1, (2.5, ("x", None)), [3, (4,)], ()), "l": [(), [()], [[1]]], "flags": (True, False)}
    assert_same(tree, roundtrip(tree))


def test_dicts_with_non_string_keys_round_trip():
    tree = {"by_int": {0: "a", 1: "b", -3: "c"}, "by_tuple": {(1, 2): 3.0}, "mixed": {None: 1, True: 2, 2.5: 3, "s": 4}}
    assert_same(tree, roundtrip(tree))


def test_dicts_with_dunder_keys_are_not_mistaken_for_tags():
    tree = {
        "a": {"__tensor__": "not a reference"},
        "b": {"__tuple__": [1, 2]},
        "c": {"__dict__": [], "__bytes__": "AAA="},
        "d": {"__float__": "nan"},
        "e": {"__private": 1, "plain": 2},
    }
    assert_same(tree, roundtrip(tree))


def test_empty_containers_round_trip():
    tree = {"d": {}, "l": [], "t": (), "s": "", "none": None, "zero": 0, "big": 2**70}
    assert_same(tree, roundtrip(tree))


def test_numpy_scalars_and_arrays_become_plain_values():
    np = pytest.importorskip("numpy")
    restored = roundtrip({"f": np.float64(1.5), "i": np.int64(3), "a": np.arange(3, dtype=np.uint32)})
    assert restored == {"f": 1.5, "i": 3, "a": [0, 1, 2]}


# -- tensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8, torch.int8]
)
def test_tensor_dtypes_round_trip_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        t = torch.rand(3, 5, generator=g) > 0.5
    elif dtype.is_floating_point:
        t = torch.randn(3, 5, generator=g).to(dtype)
        t[0, 0] = float("nan")
        t[0, 1] = float("inf")
    else:
        t = torch.randint(0, 100, (3, 5), generator=g).to(dtype)
    restored = roundtrip({"t": t})["t"]
    assert restored.dtype == dtype
    # compare raw bits so that NaN payloads count too
    assert torch.equal(restored.view(torch.uint8), t.view(torch.uint8))


def test_zero_dim_and_empty_tensors_round_trip():
    tree = {"scalar": torch.tensor(3.5), "step": torch.tensor(7, dtype=torch.int64), "empty": torch.zeros(0, 4)}
    assert_same(tree, roundtrip(tree))


def test_non_contiguous_views_round_trip_by_value():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tree = {"transposed": base.t(), "strided": base[:, ::2], "slice": base[1:3], "expanded": torch.ones(3, 1).expand(3, 4)}
    assert not tree["transposed"].is_contiguous()
    restored = roundtrip(tree)
    for key, tensor in tree.items():
        assert torch.equal(restored[key], tensor), key


def test_a_tensor_and_a_view_of_it_are_stored_separately_by_value():
    base = torch.arange(10.0)
    tree = {"base": base, "view": base[2:5]}
    restored = roundtrip(tree)
    assert torch.equal(restored["base"], base)
    assert torch.equal(restored["view"], base[2:5])


def test_tied_tensors_are_stored_once_and_decode_to_the_same_tensor():
    shared = torch.randn(4, 4)
    structure, tensors = codec.encode({"a": shared, "nested": {"b": shared}, "other": shared.clone()})
    assert len(tensors) == 2
    restored = roundtrip({"a": shared, "nested": {"b": shared}})
    assert restored["a"] is restored["nested"]["b"]
    assert torch.equal(restored["a"], shared)


def test_tensors_keep_their_path_as_key():
    _, tensors = codec.encode({"optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}}})
    assert list(tensors) == ["optimizer/state/0/exp_avg"]


@pytest.mark.parametrize(
    "make_tree",
    [
        lambda a, b: {"a/b": a, "a": {"b": b}},
        lambda a, b: {0: a, "0": b},
    ],
    ids=["slash-in-key", "int-and-str-key"],
)
def test_tensors_at_distinct_paths_whose_names_collide_are_kept_apart(make_tree):
    a, b = torch.ones(2), torch.zeros(2)
    tree = make_tree(a, b)
    assert_same(tree, roundtrip(tree))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_split_model_state_stores_tied_weights_once_under_the_first_key():
    torch.manual_seed(0)
    state = TiedLM().state_dict()
    tensors, aliases = codec.split_model_state(state)
    assert aliases == {"head.weight": "embed.weight"}
    assert "head.weight" not in tensors
    assert set(tensors) == {"embed.weight", "body.weight", "body.bias"}


def test_decode_model_restores_the_tied_alias():
    torch.manual_seed(0)
    model = TiedLM()
    files = fmt.encode_shared(fmt.Snapshot(model=model.state_dict(), train={}))
    restored = fmt.decode_model(files)
    assert set(restored) == set(model.state_dict())
    assert restored["head.weight"] is restored["embed.weight"]
    for key, value in model.state_dict().items():
        assert torch.equal(restored[key], value), key
    fresh = TiedLM()
    fresh.load_state_dict(restored)
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.head.weight, model.embed.weight)


def test_split_model_state_rejects_a_non_tensor_entry_naming_it():
    with pytest.raises(CheckpointError, match="extra_state"):
        codec.split_model_state({"w": torch.zeros(1), "extra_state": {"x": 1}})


# -- refusals and corruption ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "tree, path",
    [
        ({"a": {"b": {1, 2}}}, "a/b"),
        ({"hooks": [0, lambda x: x]}, "hooks/1"),
        ({"obj": object()}, "obj"),
        ({"state": (1, frozenset())}, "state/1"),
    ],
)
def test_unsupported_object_raises_checkpoint_error_naming_the_path(tree, path):
    with pytest.raises(CheckpointError) as excinfo:
        codec.encode(tree)
    assert f"'{path}'" in str(excinfo.value)


def test_unsupported_object_at_the_root_is_named_as_slash():
    with pytest.raises(CheckpointError, match="'/'"):
        codec.encode({1, 2})


def test_dangling_tensor_reference_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="missing"):
        codec.decode({"x": {"__tensor__": "missing"}}, {})


def test_invalid_json_bytes_are_a_checkpoint_error_naming_the_file():
    with pytest.raises(CheckpointError, match="state.json"):
        codec.loads_json(b"{not json", "state.json")


def test_invalid_safetensors_bytes_are_a_checkpoint_error_naming_the_file():
    with pytest.raises(CheckpointError, match="model.safetensors"):
        codec.tensors_from_bytes(b"\x00" * 16, "model.safetensors")


def test_encode_does_not_mutate_its_input():
    tree = {"t": (1, 2), "d": {0: torch.ones(2)}, "f": float("nan")}
    before = copy.deepcopy(tree)
    codec.encode(tree)
    assert_same(before, tree)
