"""The Optuna study of a tuning sweep: opened (created or loaded) with its sampler, which
trials count towards ``n_trials``, a lost trial asked again, and the study read back for the
report (``read_study``)."""

from pathlib import Path
from typing import Any

from lipexp.config.overrides import override_key
from lipexp.tune.spec import METRICS, SPEC_FILE, STUDY_FILE, TuneError, TuneSpec, number_or_none


def _sampler(spec: TuneSpec, seed_offset: int):
    """``optuna.samplers.<sampler.name>(**rest)`` (default TPESampler); a ``seed`` is offset
    by the number of trials already in the study, so that a restart does not draw its first
    trials again. With a ``clean_error_cap`` on an Optuna without ``Trial.set_constraint``
    (< 5), the sampler reads the constraint from the trial's user attributes."""
    import inspect

    import optuna

    kwargs = dict(spec.sampler)
    name = kwargs.pop("name", "TPESampler")
    cls = getattr(optuna.samplers, str(name), None)
    if not isinstance(cls, type):
        raise TuneError(f"sampler: optuna.samplers has no {name!r}")
    if isinstance(kwargs.get("seed"), int):
        kwargs["seed"] += seed_offset
    if (spec.clean_error_cap is not None and not hasattr(optuna.trial.Trial, "set_constraint")
            and "constraints_func" in inspect.signature(cls).parameters):
        kwargs["constraints_func"] = _constraints
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TuneError(f"sampler: {name}: {e}") from None


def _constraints(trial) -> list[float]:
    return list(trial.user_attrs.get("constraint", [0.0]))


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tune prints its own line per trial


def open_study(spec: TuneSpec):
    """The study of ``spec`` (created, or loaded: ``load_if_exists``); TuneError if the
    stored one has other objectives or cap."""
    import optuna

    quiet_optuna()
    storage: Any = spec.storage_url
    if storage.startswith("sqlite:"):  # several tune processes may share the file
        storage = optuna.storages.RDBStorage(storage, engine_kwargs={
            "connect_args": {"timeout": 60}})
    study = optuna.create_study(storage=storage, study_name=spec.name, load_if_exists=True,
                                directions=spec.directions)
    stored = study.user_attrs.get("objectives")
    if stored is None:
        study.set_user_attr("objectives", spec.objectives)
        study.set_user_attr("clean_error_cap", spec.clean_error_cap)
    elif (stored != spec.objectives
          or study.user_attrs.get("clean_error_cap") != spec.clean_error_cap):
        raise TuneError(
            f"study {spec.name!r} in {spec.storage_url} has objectives {stored} and clean error "
            f"cap {study.user_attrs.get('clean_error_cap')}, not {spec.objectives} and "
            f"{spec.clean_error_cap}: use another name= or hydra.sweep.dir=")
    study.sampler = _sampler(spec, len(study.trials))
    return study


def counted(trial) -> bool:
    """Whether a finished trial counts towards ``n_trials``: complete (or pruned), or failed
    because its run failed (user attribute ``error``); not a lost one."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def requeue(study, trial) -> None:
    """A lost trial: failed without ``error`` (not counted), its parameters asked again."""
    from optuna.trial import TrialState

    study.tell(trial.number, state=TrialState.FAIL)
    study.enqueue_trial(dict(trial.params), user_attrs={"rerun_of": trial.number})



def read_study(folder: str | Path) -> dict[str, Any] | None:
    """The study of a sweep folder that ``tune`` wrote (None: no tune.yaml there): ``{"name",
    "objectives", "clean_error_cap", "params" (the tuned keys), "storage", "trials": [{"number",
    "state", "params", "run_folder", "clean_error", "l2_median", "linf_median", "error",
    "rerun_of", "counted"}]}``."""
    import yaml

    folder = Path(folder)
    if not (folder / SPEC_FILE).is_file():
        return None
    record = yaml.safe_load((folder / SPEC_FILE).read_text()) or {}
    import optuna

    quiet_optuna()
    storage = record.get("storage") or f"sqlite:///{(folder / STUDY_FILE).resolve()}"
    study = optuna.load_study(study_name=record["name"], storage=storage)
    trials = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        trials.append({"number": t.number, "state": t.state.name, "params": dict(t.params),
                       "run_folder": attrs.get("run_folder"), "error": attrs.get("error"),
                       "rerun_of": attrs.get("rerun_of"), "counted": counted(t),
                       **{m: number_or_none(attrs.get(m)) for m in METRICS}})
    return {"name": record["name"], "objectives": record.get("objectives", []),
            "clean_error_cap": record.get("clean_error_cap"),
            "params": [override_key(k) for k in record.get("params", {})],
            "storage": storage, "trials": trials}
