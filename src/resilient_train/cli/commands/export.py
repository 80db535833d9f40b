"""`export TARGET OUT`: the model weights alone (safetensors), or a Hugging Face folder (--format hf)."""

from __future__ import annotations

import argparse
import posixpath
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resilient_train.checkpoint.manager import CheckpointManager

NAME = "export"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(NAME, parents=[common], help="write the model weights alone (safetensors), or a Hugging Face folder",
                       description="Write the model weights of TARGET (a run: its newest valid checkpoint; or one checkpoint folder) to "
                                   "OUT, keys as in your model. With --format hf, OUT is a folder that Hugging Face's from_pretrained "
                                   "loads (config, weights, tokenizer; a PEFT model's adapter files), the model rebuilt from the run's "
                                   "task snapshot; needs pip install 'resilient_train[hf]'.")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("out", metavar="OUT", help="OUT.safetensors, or a folder with --format hf")
    p.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                   help="safetensors (default): one file of weights; hf: a save_pretrained folder")


def run(args: argparse.Namespace) -> int:
    if args.format == "hf":
        return _export_hf(args)
    from resilient_train.checkpoint import tensorfile
    from resilient_train.export_target import refuse_run_owned_target
    from resilient_train.storage import Storage

    refuse_run_owned_target(args.out)  # never over run.yaml or into a checkpoint it exports from
    _, step, model = _load_weights(args.target)
    seen: dict[int, str] = {}
    tensors = {}
    for key, tensor in model.items():  # tied weights become independent copies, as safetensors requires
        tensors[key] = tensor.clone() if id(tensor) in seen else tensor
        seen[id(tensor)] = key
    out_dir, out_name = posixpath.split(args.out)
    # our own safetensors writer: the safetensors package imports numpy to save, and a plain
    # install (a minimal image, a CI container) may have no numpy
    chunks = tensorfile.serialize(tensors, metadata={"step": str(step)})
    Storage(out_dir or ".").write_bytes(list(chunks.chunks), out_name)
    print(f"exported {len(tensors)} tensors from step {step} to {args.out}", file=sys.stderr)
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from resilient_train.export_hf import check_target, export_hf, require_transformers

    require_transformers()  # before any checkpoint is read
    check_target(args.out)
    manager, step, model = _load_weights(args.target)
    done = export_hf(manager.run, model, args.out)
    what = f"{done.model_class} adapter (PEFT)" if done.adapter else done.model_class
    print(f"exported {what} from step {step} to {args.out}: {', '.join(done.files)}", file=sys.stderr)
    return 0


def _load_weights(target: str) -> tuple[CheckpointManager, int, Any]:
    """The model weights of TARGET (a checkpoint folder, or a run's newest valid checkpoint) and their step."""
    from resilient_train.checkpoint import format as fmt
    from resilient_train.checkpoint.selection import load_newest_valid
    from resilient_train.cli.commands._shared import resolve_checkpoint
    from resilient_train.errors import NotFoundError

    manager, info = resolve_checkpoint(target)
    wanted = {fmt.MODEL_FILE, fmt.STATE_JSON}
    if info is not None:  # one checkpoint named: its defects are the answer
        loaded = manager.load(info, wanted)
        model = fmt.decode_model(loaded.files)
    else:  # a run: the newest checkpoint whose weights decode
        found = load_newest_valid([manager], wanted, decode=lambda c: fmt.decode_model(c.files))
        if found is None:
            raise NotFoundError(f"no valid checkpoint in '{target}'")
        _, loaded, model = found
    return manager, loaded.info.step, model
