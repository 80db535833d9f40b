"""Config resolution: layer precedence, validation that names the key, Trainer keywords, run.yaml."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
from omegaconf import DictConfig, OmegaConf

from resilient_train import config
from resilient_train.config import CheckpointConfig, RunConfig, TrainerConfig, kwargs_layer
from resilient_train.errors import ConfigError, UsageError

TASK_CONFIG = {
    "task": {"hidden": 128, "lr": 3e-4},
    "trainer": {"max_steps": 500, "batch_size": 16, "precision": "32-true"},
    "checkpoint": {"keep_last": 5},
}


@pytest.fixture
def yaml_layer(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "trainer:\n"
        "  max_steps: 700\n"
        "  batch_size: 8\n"
        "task:\n"
        "  lr: 0.001\n"
    )
    return config.load_yaml_layer(str(path))


def _expect_config_error(*layers, key: str) -> ConfigError:
    with pytest.raises(ConfigError) as excinfo:
        config.resolve(*layers)
    assert excinfo.value.key == key
    assert f"'{key}'" in str(excinfo.value)
    return excinfo.value


# -- precedence ----------------------------------------------------------------------------------


def test_resolve_without_layers_gives_the_schema_defaults():
    cfg = config.resolve()
    assert cfg == RunConfig()
    assert cfg.trainer.max_steps == TrainerConfig().max_steps
    assert cfg.checkpoint.keep_last == CheckpointConfig().keep_last


def test_task_config_overrides_defaults_and_leaves_other_keys_at_default():
    cfg = config.resolve(TASK_CONFIG)
    assert cfg.trainer.max_steps == 500
    assert cfg.trainer.batch_size == 16
    assert cfg.checkpoint.keep_last == 5
    assert cfg.task == {"hidden": 128, "lr": 3e-4}
    assert cfg.trainer.accumulate_grad_batches == TrainerConfig().accumulate_grad_batches
    assert cfg.seed == RunConfig().seed


def test_yaml_file_overrides_task_config(yaml_layer):
    cfg = config.resolve(TASK_CONFIG, yaml_layer)
    assert cfg.trainer.max_steps == 700
    assert cfg.trainer.batch_size == 8
    assert cfg.task["lr"] == 0.001
    # keys the yaml does not mention keep the task CONFIG value
    assert cfg.task["hidden"] == 128
    assert cfg.trainer.precision == "32-true"
    assert cfg.checkpoint.keep_last == 5


def test_key_value_overrides_win_over_yaml_and_task_config(yaml_layer):
    overrides = config.parse_overrides(["trainer.max_steps=900", "task.lr=0.5", "seed=7"])
    cfg = config.resolve(TASK_CONFIG, yaml_layer, overrides)
    assert cfg.trainer.max_steps == 900
    assert cfg.task["lr"] == 0.5
    assert cfg.seed == 7
    assert cfg.trainer.batch_size == 8  # from the yaml, untouched by the overrides
    assert cfg.task["hidden"] == 128  # from the task CONFIG


def test_none_layers_are_skipped():
    assert config.resolve(None, TASK_CONFIG, None) == config.resolve(TASK_CONFIG)


def test_overrides_parse_values_as_yaml():
    layer = config.parse_overrides(
        ["trainer.gradient_clip_val=1e-3", "trainer.gradient_checkpointing=true", "trainer.devices=[0,1]"]
    )
    cfg = config.resolve(layer)
    assert cfg.trainer.gradient_clip_val == pytest.approx(1e-3)
    assert cfg.trainer.gradient_checkpointing is True
    assert list(cfg.trainer.devices) == [0, 1]


@pytest.mark.parametrize("item", ["trainer.max_steps", "=5", "no-equals-sign"])
def test_override_without_key_value_form_is_a_usage_error(item):
    with pytest.raises(UsageError, match="KEY=VALUE"):
        config.parse_overrides([item])


def test_missing_yaml_file_is_a_usage_error_naming_the_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(UsageError, match="nope.yaml"):
        config.load_yaml_layer(path)


def test_yaml_file_holding_a_list_is_a_usage_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="mapping"):
        config.load_yaml_layer(str(path))


def test_invalid_yaml_file_is_a_usage_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer: [unclosed\n")
    with pytest.raises(UsageError, match="bad.yaml"):
        config.load_yaml_layer(str(path))


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, key",
    [
        ({"trainer": {"max_stepz": 10}}, "trainer.max_stepz"),
        ({"checkpoint": {"keep_lats": 1}}, "checkpoint.keep_lats"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_unknown_key_is_rejected_naming_the_key(layer, key):
    err = _expect_config_error(layer, key=key)
    assert "unknown key" in str(err)


def test_user_task_section_accepts_any_keys():
    cfg = config.resolve({"task": {"anything": {"nested": [1, 2]}, "lr": 0.1}})
    assert cfg.task["anything"]["nested"] == [1, 2]


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("trainer.batch_size=1.5", "trainer.batch_size"),
        ("trainer.gradient_checkpointing=maybe", "trainer.gradient_checkpointing"),
        ("checkpoint.every_n_steps=often", "checkpoint.every_n_steps"),
        ("seed=abc", "seed"),
    ],
)
def test_wrong_type_is_rejected_naming_the_key(override, key):
    _expect_config_error(config.parse_overrides([override]), key=key)


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.max_steps=-5", "trainer.max_steps"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
        ("trainer.gradient_clip_val=-1.0", "trainer.gradient_clip_val"),
        ("trainer.num_workers=-1", "trainer.num_workers"),
        ("trainer.num_nodes=0", "trainer.num_nodes"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.accelerator=quantum", "trainer.accelerator"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("checkpoint.every_n_steps=-1", "checkpoint.every_n_steps"),
        ("checkpoint.every_minutes=0", "checkpoint.every_minutes"),
        ("seed=-1", "seed"),
        ("trainer.max_steps=null", "trainer.max_steps"),
    ],
)
def test_impossible_value_is_rejected_naming_the_key(override, key):
    _expect_config_error(config.parse_overrides([override]), key=key)


def test_unknown_precision_message_lists_the_valid_choices():
    err = _expect_config_error({"trainer": {"precision": "fp8"}}, key="trainer.precision")
    assert "bf16-mixed" in str(err)


def test_empty_run_dir_is_rejected_naming_the_key():
    _expect_config_error({"run_dir": "  "}, key="run_dir")


@pytest.mark.parametrize("devices", ["foo", 0, -2, True, 1.5, ["a"]])
def test_bad_devices_are_rejected_naming_the_key(devices):
    _expect_config_error({"trainer": {"devices": devices}}, key="trainer.devices")


@pytest.mark.parametrize("devices", [[], [0, -1]])
def test_empty_or_negative_device_list_is_rejected_naming_the_key(devices):
    _expect_config_error({"trainer": {"devices": devices}}, key="trainer.devices")


@pytest.mark.parametrize("devices", ["auto", 1, 4, -1, [0], [0, 1]])
def test_valid_devices_are_accepted(devices):
    cfg = config.resolve({"trainer": {"devices": devices}})
    assert cfg.trainer.devices == devices or list(cfg.trainer.devices) == devices


def test_keep_last_none_keeps_every_checkpoint_and_is_accepted():
    cfg = config.resolve(config.parse_overrides(["checkpoint.keep_last=null"]))
    assert cfg.checkpoint.keep_last is None


def test_config_error_is_a_usage_error_with_exit_code_2():
    with pytest.raises(UsageError) as excinfo:
        config.resolve({"trainer": {"max_steps": -1}})
    assert excinfo.value.exit_code == 2


# -- Trainer keywords ----------------------------------------------------------------------------


def test_flat_trainer_keywords_land_in_their_sections():
    layer = config.kwargs_layer(
        {"run_dir": "runs/x", "seed": 3, "max_steps": 50, "batch_size": 4, "keep_last": 2, "every_minutes": 5.0}
    )
    assert layer == {
        "run_dir": "runs/x",
        "seed": 3,
        "trainer": {"max_steps": 50, "batch_size": 4},
        "checkpoint": {"keep_last": 2, "every_minutes": 5.0},
    }
    cfg = config.resolve(layer)
    assert (cfg.run_dir, cfg.seed) == ("runs/x", 3)
    assert (cfg.trainer.max_steps, cfg.trainer.batch_size) == (50, 4)
    assert (cfg.checkpoint.keep_last, cfg.checkpoint.every_minutes) == (2, 5.0)


def test_whole_sections_may_be_given_as_dicts_or_dataclasses():
    layer = config.kwargs_layer(
        {"checkpoint": {"keep_last": 1}, "trainer": TrainerConfig(max_steps=9), "task": {"lr": 0.2}}
    )
    cfg = config.resolve(layer)
    assert cfg.checkpoint.keep_last == 1
    assert cfg.trainer.max_steps == 9
    assert cfg.task == {"lr": 0.2}


def test_unknown_trainer_keyword_is_a_usage_error_naming_it():
    with pytest.raises(UsageError, match="max_stepz"):
        config.kwargs_layer({"max_stepz": 10})


def test_keyword_values_are_validated_like_any_layer():
    _expect_config_error(config.kwargs_layer({"keep_last": 0}), key="checkpoint.keep_last")


def test_keywords_override_the_task_config_when_given_last():
    cfg = config.resolve(TASK_CONFIG, config.kwargs_layer({"max_steps": 11}))
    assert cfg.trainer.max_steps == 11
    assert cfg.trainer.batch_size == 16


# -- hash and run.yaml ---------------------------------------------------------------------------


def test_hash_ignores_run_dir():
    a = config.resolve(TASK_CONFIG, {"run_dir": "runs/a"})
    b = config.resolve(TASK_CONFIG, {"run_dir": "gs://bucket/b"})
    assert a.hash() == b.hash()


@pytest.mark.parametrize("layer", [{"seed": 1}, {"trainer": {"max_steps": 501}}, {"task": {"lr": 1.0}}])
def test_hash_changes_with_anything_that_shapes_training(layer):
    base = config.resolve(TASK_CONFIG)
    assert config.resolve(TASK_CONFIG, layer).hash() != base.hash()


def test_hash_is_stable_across_calls():
    cfg = config.resolve(TASK_CONFIG)
    assert cfg.hash() == config.resolve(TASK_CONFIG).hash()
    assert len(cfg.hash()) == 16


def test_to_yaml_round_trips_through_load_run_yaml_and_resolve(yaml_layer):
    original = config.resolve(
        TASK_CONFIG,
        yaml_layer,
        config.parse_overrides(
            ["run_dir=gs://bucket/exp1", "trainer.devices=[0,1]", "checkpoint.every_minutes=7.5",
             "trainer.gradient_clip_val=0.5", "trainer.checkpoint_modules=[Block]"]
        ),
    )
    restored = config.resolve(config.load_run_yaml(original.to_yaml()))
    assert restored == original
    assert restored.hash() == original.hash()


def test_load_run_yaml_rejects_a_non_mapping():
    with pytest.raises(UsageError):
        config.load_run_yaml("- just\n- a list\n")


def test_to_dictconfig_gives_attribute_access():
    cfg = config.resolve(TASK_CONFIG).to_dictconfig()
    assert cfg.task.lr == 3e-4
    assert cfg.trainer.max_steps == 500


def test_to_dictconfig_is_a_typed_copy_the_task_may_change():
    resolved = config.resolve(TASK_CONFIG)
    first, second = resolved.to_dictconfig(), resolved.to_dictconfig()
    assert OmegaConf.get_type(first) is RunConfig
    with pytest.raises(Exception):
        first.trainer.max_steps = "many"  # typed: a str is refused where an int belongs
    with pytest.raises(Exception):
        first.trainer.no_such_key = 1  # structured: no new keys
    first.task.lr = 1.0
    first.trainer.max_steps = 9
    assert second.task.lr == 3e-4 and second.trainer.max_steps == 500
    assert "max_steps: 500" in resolved.to_yaml() and resolved.hash() == config.resolve(TASK_CONFIG).hash()


@pytest.mark.parametrize("layers", [
    [TASK_CONFIG],
    [{"task": {"x": 1, "ref": "${seed}", "esc": "\\${task.x}", "l": [1, {"a": None}]}}, {"seed": 3}],
    [{"logging": {"trackers": "TensorBoard"}, "trainer": {"max_steps": 7}}],  # normalised by __post_init__
    [{"task": {"f": 1.0, "i": 1, "b": True}}, {"checkpoint": {"every_n_steps": None}}],
])
def test_the_task_gets_the_same_view_as_one_built_from_the_resolved_values(layers):
    """`resolve` hands its merged config on as the view only when it holds exactly the resolved
    values: an interpolation, an escaped `${` or a value `__post_init__` changed gets a view built
    from the object, as before."""
    resolved = config.resolve(*layers)
    view, built = resolved.to_dictconfig(), OmegaConf.structured(resolved)
    assert OmegaConf.get_type(view) is RunConfig
    assert OmegaConf.to_container(view, resolve=False) == OmegaConf.to_container(built, resolve=False)
    assert resolved.to_yaml() == OmegaConf.to_yaml(built)
    view.seed = 99  # the task's copy: nothing in it refers back to another key
    assert OmegaConf.to_container(view.task, resolve=True) == OmegaConf.to_container(built.task, resolve=True)


def test_a_run_started_from_the_command_line_builds_its_omegaconf_view_once() -> None:
    """The CLI's layers (the task's CONFIG, KEY=VALUE overrides, --run-dir) are plain: `resolve`
    hands its merge on as the view instead of building it again (~7 ms of every start)."""
    resolved = config.resolve(TASK_CONFIG, config.parse_overrides(["trainer.max_steps=10", "logging.trackers=[]", "task.l=[1,2]"]),
                              {"run_dir": "/tmp/x"})
    assert "view" in resolved.__dict__.get("_memo", {})
    assert OmegaConf.to_yaml(resolved.to_dictconfig()) == OmegaConf.to_yaml(OmegaConf.structured(resolved))


@dataclasses.dataclass
class _TypedTask:
    weights: dict[str, float] = dataclasses.field(default_factory=lambda: {"a": 1.0})


def _readonly_inside() -> DictConfig:
    layer = OmegaConf.create({"task": {"lr": 0.1}})
    OmegaConf.set_readonly(layer.task, True)
    return layer


@pytest.mark.parametrize("make_layer", [
    lambda: OmegaConf.create({"task": {"lr": 0.1}}, flags={"readonly": True}),
    lambda: OmegaConf.create({"task": {"lr": 0.1}}, flags={"struct": True}),
    lambda: {"task": OmegaConf.structured(_TypedTask)},  # typed nodes inside a plain dict
    lambda: _readonly_inside(),
], ids=["readonly", "struct", "typed-nodes", "readonly-inside"])
def test_an_omegaconf_layers_flags_and_types_do_not_reach_the_tasks_cfg(make_layer):
    """The task's `cfg` is the schema's view of the values, whatever kind of layer gave them: a
    read-only or struct layer (a Hydra config) must not make it read-only or closed to new keys,
    and a layer's typed nodes must not refuse values the schema's `task: dict` takes."""
    layer = make_layer()
    cfg = config.resolve(layer if isinstance(layer, DictConfig) else kwargs_layer(layer)).to_dictconfig()
    if "weights" in cfg.task:
        cfg.task.weights.b = "any value"
    else:
        cfg.task.lr = 0.2
        cfg.task.new_key = 1
    assert OmegaConf.get_type(cfg) is RunConfig


@pytest.mark.parametrize("task", [
    {"x": 1, "s": ["???", "${task.x}", "\\${task.x}", "1", "1.5", "true", "null", "", " lead", "a: b", "- x", "#c", "é✓"]},
    {"multi": "line one\nline two\n", "long": "word " * 40, "quote": "it's \"q\"", "tab": "a\tb"},
    {"nums": [0, -1, 2**40, 1e-4, 1e300, float("inf"), float("-inf"), 0.1 + 0.2], "b": [True, False, None]},
    {"nested": {"a": [{"b": [1, [2, 3]]}, {}], "c": {}}, "empty": [], "n": None},
])
def test_the_hash_text_is_what_omegaconf_prints_for_any_plain_task(task):
    from resilient_train.config.schema import _omegaconf_yaml

    data = {"seed": 0, "task": task}  # what a config holds: resolve refuses "???" and resolves ${...}
    assert _omegaconf_yaml(data) == OmegaConf.to_yaml(OmegaConf.create(data))


def test_the_hash_text_has_no_yaml_anchors_when_a_list_or_mapping_appears_twice():
    from resilient_train.config.schema import _omegaconf_yaml

    shared_list, shared_map = [1, 2], {"a": 1}
    data = {"task": {"x": shared_list, "y": shared_list, "m": shared_map, "n": [shared_map, shared_map]}}
    text = _omegaconf_yaml(data)
    assert "&id" not in text and "*id" not in text
    assert text == OmegaConf.to_yaml(OmegaConf.create(data))


def test_the_hash_of_a_config_whose_resolver_returns_one_list_twice_is_omegaconfs():
    shared = [1, 2]
    with warnings.catch_warnings():  # OmegaConf 2.4 renamed it; 2.3 (our floor) has only this name
        warnings.simplefilter("ignore", UserWarning)
        OmegaConf.register_new_resolver("rt_test_pair", lambda: [shared, shared], replace=True)
    try:
        cfg = config.resolve({"task": {"x": "\\${rt_test_pair:}"}})
        data = cfg.to_container()
        data.pop("run_dir")
        data.pop("logging")
        import hashlib

        assert cfg.hash() == hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(data)).encode()).hexdigest()[:16]
    finally:
        OmegaConf.clear_resolver("rt_test_pair")


def test_the_hash_text_of_data_that_is_not_plain_is_omegaconfs():
    import enum
    import pathlib

    from resilient_train.config.schema import _omegaconf_yaml

    class Mode(enum.Enum):
        FAST = 1

    for data in ({"task": {"mode": Mode.FAST}}, {"task": {"path": pathlib.Path("/x")}}, {"task": {1: "int key"}},
                 {"task": {"t": (1, 2)}}):
        assert _omegaconf_yaml(data) == OmegaConf.to_yaml(OmegaConf.create(data))


# -- derived forms are kept, and never outlive a change ------------------------------------------------
def test_the_config_hash_of_existing_runs_is_unchanged():
    # values computed by the releases that wrote today's checkpoints: a new digest would label
    # every resume of an older run as a config change
    assert config.resolve({}).hash() == "6728e09a7c5c75a2"
    layer = {"task": {"lr": 0.1, "x": [1, 2]}, "trainer": {"max_steps": 7}}
    assert config.resolve(layer).hash() == "3ba0a7eb3b3fb937"


def test_yaml_hash_and_plain_form_follow_a_change_made_in_place():
    cfg = config.resolve({"task": {"flag": 1}})
    yaml_before, hash_before = cfg.to_yaml(), cfg.hash()
    cfg.task["flag"] = True  # equal to 1 in Python, but another value
    assert cfg.to_yaml() != yaml_before and "flag: true" in cfg.to_yaml()
    assert cfg.hash() != hash_before
    assert cfg.to_container()["task"]["flag"] is True


def test_the_plain_form_is_a_copy_the_caller_may_change():
    cfg = config.resolve({"task": {"items": [1, 2]}})
    cfg.to_container()["task"]["items"].append(3)
    assert cfg.to_container()["task"]["items"] == [1, 2]


def test_a_resolved_config_changed_in_place_is_validated_again():
    cfg = config.resolve({})
    assert config.resolve(cfg) == cfg and config.resolve(cfg) is not cfg
    cfg.trainer.max_steps = "12"  # a string, as a careless script might set it
    assert config.resolve(cfg).trainer.max_steps == 12  # normalised by the schema again
    cfg.trainer.max_steps = "many"
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        config.resolve(cfg)


def test_only_a_config_resolve_made_skips_the_schema():
    by_hand = RunConfig(trainer=TrainerConfig(max_steps=30))
    assert not by_hand.is_resolved()
    resolved = config.resolve(by_hand)
    assert resolved.is_resolved() and resolved == by_hand


def test_a_config_file_whose_section_is_an_unresolvable_interpolation_is_a_usage_error(tmp_path):
    from pathlib import Path

    from resilient_train.api import run_task

    bad = tmp_path / "bad.yaml"
    bad.write_text("checkpoint: ${nope}\n")
    task = str(Path(__file__).parent / "tasks" / "tiny.py")
    with pytest.raises(UsageError, match="'checkpoint'"):
        run_task(task, run_dir=str(tmp_path / "run"), config=str(bad))
