"""Google Cloud Storage through gcsfs.

The commit is an upload with the precondition `ifGenerationMatch=0` (gcsfs `mode="create"`), which
GCS refuses atomically when the object exists. GCS keeps a crc32c per object and lists it as
base64 of the big-endian value; it is decoded here, to the 8 hex digits a manifest records, so a
checkpoint can be checked against the store without reading it back.

gcsfs is not imported here (the filesystem instance comes from fsspec): it must be imported only
after `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` is set (design guide, section 5).
"""

from __future__ import annotations

import base64
from typing import Any, Mapping, Optional, Sequence, Union

from resilient_train.storage.backend import Buffer
from resilient_train.storage.fsspec_store import FsspecBackend, join, refuse_existing


class GcsBackend(FsspecBackend):
    """gs:// and gcs://: whole-object uploads (as any fsspec store), a generation precondition for
    the commit, the store's own crc32c per object, and gcsfs's own retries."""

    name = "gcs"
    atomic_create = True
    keeps_checksums = True
    retries_itself = True

    def create(self, path: str, data: Union[bytes, Sequence[Buffer]]) -> None:
        refuse_existing(self.fs, path)  # the emulator ignores preconditions; GCS does not
        self.fs.pipe_file(path, data if isinstance(data, bytes) else join(data), mode="create")

    def stored_checksum(self, entry: Mapping[str, Any]) -> Optional[str]:
        return crc32c_hex(entry.get("crc32c"))


def crc32c_hex(value: Any) -> Optional[str]:
    """GCS's base64 crc32c as the manifest's 8 hex digits; None when absent or not base64."""
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True).hex()
    except ValueError:  # binascii.Error is one
        return None
