"""The run folder beside the checkpoints: what a run is and what happened to it.

    folder.py     run.yaml, run.json and the task snapshot: the run's birth and refresh
    sessions.py   sessions.json: one typed record per session (resumed-from step, exactness label)
    history.py    the files that record history (sessions, metrics), merged when runs are copied
    integrity.py  half-copied snapshots told apart from a run a script made
    metrics.py    logs/metrics.csv, and the trackers (../trackers/) it feeds
    jsonfiles.py  small JSON records read without ever failing a run over bookkeeping

The trackers registry stays a package of its own below `config/`, which checks tracker names
against it; `export_target.py` (what an export never writes over) sits above `run/` and
`checkpoint/`, whose names it needs.

Importing this package imports none of them.
"""
