"""Robustness-aware tuning (``lipexp tune SWEEP_FILE``, docs/tuning.md): an Optuna study whose
trials are ordinary lipexp runs. ``spec``: the sweep file, the search space and what a trial
reports; ``study``: the Optuna study (open, count, read back); ``trials``: launching trials
and the loop (``tune``).

A sweep file (sweeps/tune_*.yaml) names the search space (``params``, in the syntax of Hydra's
Optuna sweeper: ``tag(log, interval(0.01, 1.0))``, ``interval(0.0, 0.1)``, ``choice(a, b)``,
``range(1, 5)``), the objectives (``clean_error`` down, ``l2_median`` up: the best-known
median l2 distance, results.json's ``ensemble.l2.median``; or one objective with a
``clean_error_cap``), ``n_trials`` and every trial's fixed ``overrides``. The study lives in
``<sweep folder>/study.db`` (SQLite); each trial is ``python run.py -m <overrides> <its
parameters> hydra.sweep.dir=<sweep folder>``, so it is a run like any other: its folder
``<sweep folder>/<run name>/`` with results.json (a finished run is answered from its folder),
its W&B run with ``logger=wandb``, launched by the Hydra launcher the overrides choose
(``hydra/launcher=slurm``: a SLURM job). ``jobs`` trials run at once.

Resuming: ``n_trials`` is the number of finished trials (complete, or failed because their run
failed) the study should hold; a restart runs only the missing ones. A trial whose tune process
ended while it ran (Ctrl-C, SIGKILL, a lost login node) is "lost": marked failed without an
``error`` (not counted) and its parameters asked again first, continuing its run folder
(``resume=true`` when it holds checkpoints).

Why not Hydra's Optuna sweeper (``hydra/sweeper=optuna``, hydra-optuna-sweeper 1.3.0): it pins
``optuna<3``, which resolves to optuna 2.10.1 with SQLAlchemy 2.1 and alembic 1.20, and optuna
2.10.1's RDB storage fails on SQLAlchemy 2 (``create_study(storage="sqlite:///...")``:
AssertionError in ``_VersionManager.get_current_version``, alembic reads no schema version);
it works only with ``sqlalchemy<2`` and ``alembic<1.14`` pinned as well. It would also run
``n_trials`` more trials on every start instead of the missing ones, leave the trials of a
killed sweep RUNNING, and take a trial's values from the task's return value, which for
run.py is the clean error alone. Hydra's sweepers must live in the ``hydra_plugins`` package,
so lipexp's own would be a second top-level package. Hence this command, on Optuna >= 3's
ask-and-tell API, launching each trial as its own ``run.py -m``: Hydra's multirun cannot
express a batch of trials with different parameters (it sweeps a product), so the
parallelism is ``jobs`` processes, each through the chosen launcher.
"""
