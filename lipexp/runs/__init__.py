"""Runs: building a run from its config (``build``), its folder with lock, checks and record
(``folder``, ``differences``), checkpoints, stopping on signals, loggers, provenance, the DDP
launch, and the two jobs, training (``train``) and re-evaluation (``reevaluate``)."""
