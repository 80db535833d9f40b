"""Pickle-free encoding of training state: tensors to safetensors, the rest to tagged JSON.

A checkpoint found in a shared Drive folder or bucket must be unable to run code when loaded, so
nothing here ever unpickles. `encode` walks a nested state (dicts, lists, tuples, scalars, bytes,
tensors) and returns a JSON-able tree in which every tensor is replaced by a reference into a flat
tensor table; `decode` reverses it. JSON cannot express tuples, non-string dict keys, bytes or
non-finite floats, so those carry a one-key tag object (`{"__tuple__": [...]}`). A plain dict whose
keys could be mistaken for a tag is itself tagged, so decoding is unambiguous.
"""

from __future__ import annotations

import base64
import math
from typing import Any, Union, cast

import torch

from resilient_train.checkpoint import tensorfile
from resilient_train.checkpoint.jsonio import describe, dumps_json, loads_json  # noqa: F401 - dumps_json, loads_json re-exported from their old home
from resilient_train.errors import CheckpointError

_TAGS = ("__tensor__", "__tuple__", "__dict__", "__bytes__", "__float__")


def encode(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split `tree` into (JSON-able structure, {key: tensor}); tensor keys are their paths."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach()
            ident = _storage_identity(tensor)
            if ident in seen:  # tied / shared tensors are stored once
                return {"__tensor__": seen[ident]}
            key, n = path, 1
            while key in tensors:  # "a/b" and {"a": {"b": ...}} join to the same name
                key, n = f"{path}#{n}", n + 1
            tensors[key] = tensor
            seen[ident] = key
            return {"__tensor__": key}
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
        if isinstance(obj, tuple):
            return {"__tuple__": [walk(v, _join(path, i)) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, _join(path, i)) for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            plain = all(isinstance(k, str) and not k.startswith("__") for k in obj)
            if plain:
                return {k: walk(v, _join(path, k)) for k, v in obj.items()}
            return {"__dict__": [[walk(k, _join(path, f"k{i}")), walk(v, _join(path, k))] for i, (k, v) in enumerate(obj.items())]}
        if type(obj).__module__ == "numpy":  # numpy scalars and arrays, without importing numpy
            return walk(obj.tolist(), path)
        raise CheckpointError(
            f"cannot store a {type(obj).__name__} at '{path or '/'}' in a checkpoint; "
            "state must be tensors, numbers, strings, bytes, lists, tuples or dicts"
        )

    return walk(tree, prefix), tensors


def decode(obj: Any, tensors: dict[str, torch.Tensor], name: str = "state.json") -> Any:
    """Rebuild the tree `encode` split, taking tensors from `tensors`.

    `obj` comes from a file that may be foreign or hostile: anything `encode` cannot have written
    (an unknown tag, a tag holding the wrong type, bad base64, an unhashable key) is a one-line
    CheckpointError naming `name`, never another exception.
    """
    try:
        return _decode(obj, tensors, name)
    except CheckpointError:
        raise
    except (RecursionError, MemoryError) as exc:
        raise CheckpointError(f"{name} is nested too deeply or too large to decode ({type(exc).__name__})") from None
    except Exception as exc:  # a case the checks below missed: still this checkpoint's defect
        raise CheckpointError(f"{name} cannot be decoded ({type(exc).__name__}: {_first_line(exc)})") from exc


def _decode(obj: Any, tensors: dict[str, torch.Tensor], name: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, name) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name} holds {describe(obj)}, which is not JSON")
    tagged = [k for k in obj if not isinstance(k, str) or k.startswith("__")]
    if not tagged:
        return {k: _decode(v, tensors, name) for k, v in obj.items()}
    tag = tagged[0]
    if len(obj) != 1 or tag not in _TAGS:
        # `encode` tags every dict with such a key, so a plain one cannot come from it
        raise CheckpointError(f"{name} holds an unknown tag {str(tag)[:40]!r}; the file is corrupt or not ours")
    value = obj[tag]
    if tag == "__tensor__":
        if not isinstance(value, str):
            raise _bad_tag(name, tag, value)
        if value not in tensors:
            raise CheckpointError(f"checkpoint references tensor '{value[:200]}' that is not in its tensor file")
        return tensors[value]
    if not isinstance(value, str if tag in ("__bytes__", "__float__") else list):
        raise _bad_tag(name, tag, value)
    if tag == "__tuple__":
        return tuple(_decode(v, tensors, name) for v in value)
    if tag == "__dict__":
        out = {}
        for pair in value:
            if not isinstance(pair, list) or len(pair) != 2:
                raise CheckpointError(f"{name}: a __dict__ entry is not a [key, value] pair; the file is corrupt or not ours")
            key = _decode(pair[0], tensors, name)
            try:
                hash(key)
            except TypeError:
                raise CheckpointError(f"{name}: a __dict__ key is {describe(key)}, which cannot be a key") from None
            out[key] = _decode(pair[1], tensors, name)
        return out
    if tag == "__bytes__":
        try:
            return base64.b64decode(cast(str, value), validate=True)
        except ValueError:  # binascii.Error, or non-ASCII text
            raise CheckpointError(f"{name}: a __bytes__ value is not base64; the file is corrupt or not ours") from None
    try:  # __float__
        return float(cast(str, value))
    except ValueError:
        raise CheckpointError(f"{name}: a __float__ value {value[:40]!r} is not a number; the file is corrupt or not ours") from None


def _bad_tag(name: str, tag: str, value: Any) -> CheckpointError:
    return CheckpointError(f"{name}: tag {tag} holds {describe(value)}; the file is corrupt or not ours")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of a flat tensor table (for small files; large ones use tensorfile chunks)."""
    return tensorfile.serialize(tensors).tobytes()


def tensors_from_bytes(data: Union[bytes, bytearray], name: str) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes, validated; a bytearray is viewed without a copy."""
    return tensorfile.deserialize(data, name)


def split_model_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A model state dict as (tensors to store, {tied key: key it aliases}).

    Tied weights (an LM head sharing the embedding) are stored once under their first key, so the
    safetensors file keeps the user's own key names and `export` can restore the alias.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"model state entry '{key}' is a {type(value).__name__}, not a tensor")
        ident = _storage_identity(value)
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = value.detach()
    return tensors, aliases


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _storage_identity(t: torch.Tensor) -> tuple:
    """Two tensors are "the same" (tied) when they view the same bytes the same way."""
    if t.device.type == "meta" or t.numel() == 0:
        return (id(t),)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)

