"""Tools that run on top of the trainer: they read what a run recorded, never the log text it printed."""
