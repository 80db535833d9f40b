"""ckpt-chaos result command: the exported final weights as one line that two runs can compare.

    python tests/chaos/fingerprint.py {out}/run {out}/final.safetensors

Exports with the real CLI (`export`, which picks the newest valid checkpoint, whatever its file
names) and prints the step and a SHA-256 of the exported file. The harness compares that line
with the fault-free run's; the export's own message is not printed because it names the path.
A failed export prints its last lines and exits with its code, which the harness counts as a
different result.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

def main() -> int:
    if len(sys.argv) != 3:
        sys.exit("usage: fingerprint.py RUN_DIR OUT.safetensors")
    run, out = sys.argv[1], Path(sys.argv[2])
    proc = subprocess.run([sys.executable, "-m", "resilient_train", "export", run, str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"export failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return proc.returncode
    data = out.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header length, then JSON
    step = json.loads(data[8:8 + header_len]).get("__metadata__", {}).get("step")
    print(f"step {step} sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
