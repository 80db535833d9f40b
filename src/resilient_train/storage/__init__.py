"""The fsspec seam: one run folder on local disk, a Drive mount, `gs://`, `memory://` or `s3://`.

`Storage` (core.py) is what the rest of the package uses; a `Backend` (backend.py) is the
per-store part, one module each: local.py (local disk and mounts), gcs.py (Google Cloud Storage),
fsspec_store.py (any other fsspec store), chosen by protocol in registry.py. Nothing outside this
package asks whether a URL is local: it asks a capability (`storage.backend.keeps_checksums`) or
a method that says what it needs (`storage.local_path(...)`).
"""

from resilient_train.storage.backend import Backend, Buffer
from resilient_train.storage.core import Storage
from resilient_train.storage.registry import BACKENDS, backend_for
from resilient_train.storage.retry import TRANSIENT_ERRNOS, TRANSIENT_HTTP, is_transient, with_retries

__all__ = [
    "BACKENDS",
    "TRANSIENT_ERRNOS",
    "TRANSIENT_HTTP",
    "Backend",
    "Buffer",
    "Storage",
    "backend_for",
    "is_transient",
    "with_retries",
]
