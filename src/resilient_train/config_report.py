"""`config TASK [KEY=VALUE...]`: the resolved config, each value with the layer it came from.

Values pass through four layers (defaults < the task's CONFIG < --config YAML < KEY=VALUE); when a
run does something unexpected, the first question is which layer set the value it used.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from omegaconf import OmegaConf

from resilient_train.config import RunConfig, resolve


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


def render(rows: Sequence[tuple[str, Any, str]]) -> str:
    """One `key: value  # layer` line per key, values in YAML flow style."""
    shown = [(key, _flow(value), origin) for key, value, origin in rows]
    width = max((len(key) + len(value) + 2 for key, value, _ in shown), default=0)
    return "\n".join(f"{f'{key}: {value}':<{width}}  # {origin}" for key, value, origin in shown)


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
        return OmegaConf.to_container(value.to_dictconfig(), resolve=True)
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value if isinstance(value, Mapping) else {}


def _flow(value: Optional[Any]) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and (not value or value != value.strip()):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key}: {_flow(item)}" for key, item in value.items()) + "}"
    return str(value)
