"""The training loop, in the order a session runs it.

- `session.py`  builds a `Session` once per `fit`: everything the loop needs, in one typed object;
- `resume.py`   picks and restores the newest valid checkpoint (rank 0 chooses, all restore);
- `train.py`    the loop itself, readable top to bottom;
- `step.py`     one optimizer step's forward/backward: micro-batches, device chunks, OOM retry;
- `window.py`   the log window: loss, lr, throughput and custom metrics every N steps;
- `validate.py` validation that leaves the RNG streams and module modes as it found them;
- `layout.py`   the batch layout a checkpoint records (typed);
- `parts.py`    turning what the user passed (optimizer factory, scheduler, step function) into parts;
- `comm.py`     the few collectives the loop uses, typed.

Nothing is imported here: `resilient_train.trainer` is the entry point.
"""
