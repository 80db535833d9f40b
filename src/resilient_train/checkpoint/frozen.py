"""Which model tensors a save stores once per run, and under which content-derived names.

Trainable parameters change at every optimizer step and go into the checkpoint itself. Every
other tensor (frozen parameters, buffers) goes into a shared file (checkpoint/shared.py) unless it
changed since the previous save of this session. For a frozen parameter that is told without
hashing the model: the live tensor's storage pointer and in-place version counter
(`Tensor._version`, bumped by every in-place write through the tensor: `.copy_()`, `.mul_()`, an
optimizer update; not by writes through `.data`, which has a counter of its own). Buffers are
compared by a crc32c of their bytes at every save, because kernels update some of them without
bumping the counter (BatchNorm's running statistics); buffers are small. A tensor that changed is
stored in the checkpoint; once it stays unchanged from one save to the next it is shared again
(under a new name, since its content is new).

A shared file's name is derived from its bytes: the crc32c the manifest records anyway, the size,
and a sha256 of evenly spaced samples of the data (a change that keeps the crc32c and every
sample is not a change an accident makes), so the same tensors always get the same name, across
sessions and machines, and an existing file of that name is the same content. Frozen parameters
are spread over ceil(total / `GROUP_BYTES`) files by a hash of their key (a few large files, as
Drive and GCS like them, whose membership does not move when one tensor changes); buffers share
one file of their own. Names are computed where
the bytes are serialised (in the background for an async save) and cached while the tensors'
versions stay the same, so a save after the first hashes nothing it stored before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from resilient_train.checkpoint import manifest, tensorfile
from resilient_train.checkpoint.manifest import file_record
from resilient_train.checkpoint.shared import Placed, SharedFiles

GROUP_BYTES = 256 << 20  # frozen parameters are spread over ceil(total / this) files
_SAMPLES, _SAMPLE_BYTES = 256, 64

Version = tuple[int, int]  # (storage pointer, in-place version counter) of a live tensor


@dataclass(frozen=True)
class ModelInfo:
    """What `state.capture` records about the live model beside its tensors."""

    trainable: frozenset[str]  # keys of parameters with requires_grad
    parameters: frozenset[str] = frozenset()  # keys of all parameters (the rest are buffers)
    versions: dict[str, Version] = field(default_factory=dict)  # of every live state-dict tensor


def version_of(t: torch.Tensor) -> Version:
    return (t.untyped_storage().data_ptr(), t._version)


def content_name(chunks: tensorfile.TensorChunks, record: dict) -> str:
    """The shared file name of serialised tensors: from their crc32c, size and sampled bytes."""
    digest = hashlib.sha256(f"{record.get('crc32c') or record.get('sha256')}:{record['bytes']}".encode())
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        step = max(1, len(view) // _SAMPLES)
        for start in range(0, len(view), step):
            digest.update(view[start : start + _SAMPLE_BYTES])
    return digest.hexdigest()[:32] + ".safetensors"


Stamp = tuple  # what says a tensor is unchanged: its Version (parameters) or its crc32c (buffers)


def buffer_stamp(t: torch.Tensor) -> Stamp:
    """A buffer's content checksum: kernels update buffers in place without bumping their version
    counter (BatchNorm's running statistics), so for buffers only the bytes tell."""
    record = file_record(tensorfile.serialize({"b": t}))
    return ("content", record.get("crc32c") or record.get("sha256"))


@dataclass
class SharedGroup:
    """Tensors stored together in one shared file."""

    tensors: dict[str, torch.Tensor]
    versions: dict[str, int]  # each tensor object's version counter when the save was planned
    stamps: dict[str, Stamp] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.stamps.items()))

    def check_unchanged(self) -> None:
        """A frozen tensor written in place after the save was planned: this save must not use it."""
        for name, t in self.tensors.items():
            if t._version != self.versions[name]:
                raise RuntimeError(f"tensor {name!r} changed while its checkpoint was being written; the next save stores it")


class FrozenPlanner:
    """Lives as long as the saver: remembers versions and names from one save to the next."""

    def __init__(self) -> None:
        self._stamps: dict[str, Stamp] = {}  # at the previous save
        self._names: dict[tuple, tuple[str, dict]] = {}  # group key -> (name, record)
        # the storages the parameter stamps point at, held alive: a parameter replaced by a new
        # object must not find its old address (and version 0) reused and pass for unchanged
        self._held: list[Any] = []

    def plan(self, tensors: dict[str, torch.Tensor], info: Optional[ModelInfo]) -> tuple[dict[str, torch.Tensor], list[SharedGroup]]:
        """(tensors for the checkpoint itself, groups for shared files); no info: nothing shared."""
        if info is None:
            return dict(tensors), []
        local: dict[str, torch.Tensor] = {}
        frozen = [key for key in tensors if key in info.parameters and key not in info.trainable]
        bins = max(1, -(-sum(_nbytes(tensors[key]) for key in frozen) // GROUP_BYTES))
        members: dict[int, dict[str, torch.Tensor]] = {}
        stamps: dict[str, Stamp] = {}
        for key, t in tensors.items():
            if key in info.trainable or key not in info.versions or t.numel() == 0:
                local[key] = t
                continue
            stamp = stamps[key] = info.versions[key] if key in info.parameters else buffer_stamp(t)
            if self._stamps.get(key, stamp) != stamp:  # changed since the previous save: stored here
                local[key] = t
            else:  # buffers apart (bin -1): they may turn out to change, and must not drag the base along
                members.setdefault(_bin(key, bins) if key in info.parameters else -1, {})[key] = t
        self._stamps = stamps
        self._held = [tensors[key].untyped_storage() for key in stamps if key in info.parameters]
        groups = [SharedGroup(m, {key: t._version for key, t in m.items()}, {key: stamps[key] for key in m})
                  for _, m in sorted(members.items())]
        return local, groups

    def place(self, group: SharedGroup, store: SharedFiles, listing: dict[str, dict]) -> Optional[Placed]:
        """Put `group` into the run's shared files (or find it there); None when its name is unusable."""
        cached = self._names.get(group.key)
        if cached is not None and store.mismatch(cached[0], cached[1], listing.get(cached[0], {})) is None:
            return Placed(cached[0], cached[1])
        chunks = tensorfile.serialize(group.tensors)
        record = file_record(chunks)
        name = content_name(chunks, record)
        group.check_unchanged()  # the bytes hashed are the bytes planned
        placed = store.place(name, list(chunks), record, listing)
        group.check_unchanged()
        if placed is not None:
            if len(self._names) > 100_000:
                self._names.clear()
            self._names[group.key] = (name, record)
        return placed


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bin(key: str, bins: int) -> int:
    """A frozen parameter's file among `bins`, from its key alone: membership stays the same from
    save to save and session to session (a tensor that changes leaves only its own file)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little") % bins


def group_name(tensors: dict[str, torch.Tensor], kind: Optional[str] = None) -> str:
    """The name `place` gives these tensors (a resume asks it of the model `build()` made);
    `kind="sha256"`: the name a machine without google-crc32c gives them."""
    chunks = tensorfile.serialize(tensors)
    return content_name(chunks, file_record(chunks, kind))


def holds_its_name(tensors: dict[str, torch.Tensor], name: str) -> bool:
    """Whether a shared file's tensors are the ones its name was made from. The name covers the
    crc32c, the size and sampled bytes, so an edit that also forged the manifest's size and
    checksum still changes it, unless it keeps every sampled byte and forges the crc32c too (the
    name is not a cryptographic digest: that would cost a full sha256 of the base at every save).

    True where it cannot be computed here: a name made with crc32c read where google-crc32c is
    missing (sizes and the other checks still apply, as for any file then).
    """
    if group_name(tensors) == name:
        return True
    if manifest.google_crc32c is None:
        return True  # the name may have been made with a crc32c that cannot be computed here
    return group_name(tensors, "sha256") == name  # written where google-crc32c was missing
