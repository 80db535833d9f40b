"""The config layers and their merge: defaults < task CONFIG < --config YAML < KEY=VALUE.

Also the `Trainer(...)` keywords as a layer, the stored `run.yaml` as a layer, and which layer set
each value (what the `config` command prints): when a run does something unexpected, the first
question is which layer set the value it used.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable, Mapping, Optional, Sequence, cast

from omegaconf import AnyNode, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resilient_train.config.schema import SECTIONS, RunConfig, plain_data
from resilient_train.errors import ConfigError, UsageError


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _translate(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = _first_line(exc)
    if "Key '" in msg and "not in" in msg:
        near = nearest_key(key)
        msg = f"unknown key; did you mean {near}?" if near else "unknown key; see docs/configuration.md for the keys that exist"
    return ConfigError(key, msg)


def known_keys() -> list[str]:
    """Every dotted config key (`task.*` is free-form and not listed)."""
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS and f.name != "task"]
    for section, schema in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(schema)]
    return keys


def nearest_key(key: str) -> Optional[str]:
    """The valid key a typo most likely meant (`trainer.max_step` -> `trainer.max_steps`), if any is close."""
    import difflib

    keys = known_keys()
    names = {k.rsplit(".", 1)[-1]: k for k in keys}  # field names are unique across sections
    name = key.rsplit(".", 1)[-1]
    if name in names:  # the right name in the wrong section (or without one)
        return names[name]
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if not match:
        near = difflib.get_close_matches(name, list(names), n=1, cutoff=0.8)
        match = [names[near[0]]] if near else []
    return match[0] if match else None


def parse_overrides(items: Iterable[str]) -> DictConfig:
    """Turn `KEY=VALUE` strings into a config layer (values parsed as YAML: 3, 1e-3, true, [1,2])."""
    items = list(items)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise UsageError(f"override '{item}' is not KEY=VALUE (for example trainer.max_steps=500)")
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as exc:
        raise UsageError(f"cannot parse overrides {items}: {_first_line(exc)}") from None


def load_yaml_layer(path: str) -> DictConfig:
    """Read a `--config FILE.yaml` layer through fsspec (so it may live on Drive or GCS)."""
    import fsspec

    try:
        with fsspec.open(path, "r") as f:
            layer = OmegaConf.create(f.read())
    except FileNotFoundError:
        raise UsageError(f"config file '{path}' does not exist") from None
    except OmegaConfBaseException as exc:
        raise UsageError(f"config file '{path}' is not valid YAML: {_first_line(exc)}") from None
    except Exception as exc:  # yaml.YAMLError and friends: report, do not crash
        raise UsageError(f"config file '{path}' cannot be read: {_first_line(exc)}") from None
    if not isinstance(layer, DictConfig):
        raise UsageError(f"config file '{path}' must hold a mapping at the top level")
    return layer


def kwargs_layer(kwargs: Mapping[str, Any]) -> dict:
    """Map `Trainer(max_steps=..., every_n_steps=...)` keywords onto their config sections.

    Field names are unique across sections, so a flat keyword is unambiguous; whole sections may
    also be passed as dicts (`checkpoint={"keep_last": 2}`).
    """
    layer: dict = {}
    for name, value in kwargs.items():
        if name in ("run_dir", "seed"):
            layer[name] = value
        elif name in ("trainer", "checkpoint", "logging", "task"):
            section = dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else dict(value)
            layer.setdefault(name, {}).update(section)
        else:
            for section_name, schema in SECTIONS.items():
                if name in {f.name for f in dataclasses.fields(schema)}:
                    layer.setdefault(section_name, {})[name] = value
                    break
            else:
                near = nearest_key(name)
                hint = f"did you mean {near.rsplit('.', 1)[-1]}?" if near else "see docs/configuration.md"
                raise UsageError(f"Trainer got an unknown argument '{name}'; {hint}")
    return layer


def resolve(*layers: Any) -> RunConfig:
    """Merge layers over the defaults and validate; every failure names the offending key.

    A config this function made, unchanged since and alone, is returned as a copy without going
    through OmegaConf again (~15 ms: `Trainer(cfg)` after `run` resolved it).
    """
    given = [layer for layer in layers if layer is not None and not (isinstance(layer, dict) and not layer)]
    if len(given) == 1 and isinstance(given[0], RunConfig) and given[0].is_resolved():
        return copy.deepcopy(given[0])
    schema = OmegaConf.structured(RunConfig)
    for layer in layers:
        if layer is not None:
            _check_shapes(schema, _plain_layer(layer), "")
    try:
        merged = OmegaConf.merge(schema, *[layer for layer in layers if layer is not None])
        resolved = cast(RunConfig, OmegaConf.to_object(merged))  # runs every __post_init__
        plain = all(_untyped_layer(layer) for layer in given)
        resolved.mark_resolved(merged if plain and isinstance(merged, DictConfig) else None)
        return resolved
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(getattr(exc, "__cause__", None), ConfigError) else None
        if cause is not None:
            raise cause from None
        raise _translate(exc) from None


def _untyped_layer(layer: Any) -> bool:
    """Plain data, or an OmegaConf config made of it (`from_dotlist`, `create`): no flag, no
    structured or typed node anywhere. Only then may `resolve` hand its merge on as the view: an
    OmegaConf layer's flags (struct, read-only: a Hydra config) and typed nodes would reach the
    task's `cfg` through it."""
    if type(layer) is dict:
        return plain_data(layer)
    return OmegaConf.is_config(layer) and _untyped_node(layer)


def _untyped_node(node: Any) -> bool:
    """The node and everything under it as `plain_data` would hold it, with no flag or type."""
    meta = node._metadata
    if meta.flags or meta.ref_type is not Any or meta.object_type not in (dict, list, None):
        return False
    if isinstance(node, DictConfig):
        return (meta.key_type is Any and meta.element_type is Any
                and all(type(key) is str and _untyped_node(node._get_node(key)) for key in node))
    if isinstance(node, ListConfig):
        return meta.element_type is Any and all(_untyped_node(node._get_node(index)) for index in range(len(node)))
    return type(node) is AnyNode and plain_data(node._value())


def _plain_layer(layer: Any) -> Any:
    if isinstance(layer, RunConfig):
        return {}  # a resolved config has the schema's shape already
    if OmegaConf.is_config(layer):
        return OmegaConf.to_container(layer, resolve=False)
    return layer


def _check_shapes(schema: Any, layer: Any, prefix: str) -> None:
    """Refuse a scalar where the schema holds a section, or a mapping where it holds a list, naming
    the key: OmegaConf's merge reports these as a bare TypeError or against the key '?'."""
    if not isinstance(layer, Mapping) or not isinstance(schema, DictConfig):
        return
    for key, value in layer.items():
        node = schema._get_node(key) if key in schema else None
        name = f"{prefix}{key}"
        if isinstance(node, DictConfig) and value is not None and not isinstance(value, Mapping):
            raise ConfigError(name, f"must be a mapping of keys (for example {name}.KEY=VALUE), not {type(value).__name__} {value!r}")
        if isinstance(node, ListConfig) and isinstance(value, Mapping):
            raise ConfigError(name, f"must be a list (for example [A, B]), not a mapping {dict(value)!r}")
        if isinstance(node, DictConfig) and isinstance(value, Mapping) and name != "task":
            _check_shapes(node, value, name + ".")


def load_run_yaml(text: str) -> DictConfig:
    """Parse a stored `run.yaml` as a config layer."""
    try:
        layer = OmegaConf.create(text)
    except Exception as exc:
        raise UsageError(f"run.yaml is not valid YAML: {_first_line(exc)}") from None
    if not isinstance(layer, DictConfig):
        raise UsageError("run.yaml must hold a mapping at the top level")
    return layer


# -- which layer set each value (the `config` command) ------------------------------------------------
def sourced_values(layers: Sequence[tuple[str, Any]]) -> list[tuple[str, Any, str]]:
    """(dotted key, resolved value, name of the last layer that set it) for every key of the
    resolved config; keys no layer set come from "default". Raises what `resolve` raises."""
    config = resolve(*[layer for _, layer in layers])
    resolved = _leaves(_plain(config), "")
    source = dict.fromkeys(resolved, "default")
    for name, layer in layers:
        if layer is None:
            continue
        for key in _leaves(_plain(layer), ""):
            if key in source:
                source[key] = name
            else:  # a list or mapping value set whole: attribute it to each leaf beneath it
                for leaf in resolved:
                    if leaf.startswith(key + "."):
                        source[leaf] = name
    return [(key, resolved[key], source[key]) for key in resolved]


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    """Dotted key -> value for every leaf; lists and empty mappings ({}) are leaves too."""
    if isinstance(value, Mapping) and (value or not prefix):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _plain(value: Any) -> Any:
    if isinstance(value, RunConfig):
        return value.to_container()
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value if isinstance(value, Mapping) else {}
