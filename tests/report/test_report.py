"""lipexp.config.naming (the study's names) and lipexp.report / lipexp.cli (tables, CSVs and
figures of a folder of runs), on synthetic results.json files with the structure run.py writes."""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from lipexp.cli import main
from lipexp.config.naming import STUDY_ORDER, data_name, defence_name, model_name, run_label
from lipexp.evaluation.curves import size_key
from lipexp.files import write_json_atomic
from lipexp.report import report
from lipexp.report.runs import Run, config_notes, group_runs

from ..helpers import FIXTURES, REPO

CONF = REPO / "conf"
INF = math.inf


def conf(group: str, option: str) -> dict:
    """The ``_target_`` and fields of conf/<group>/<option>.yaml (defaults lists dropped); a
    deprecated spelling (a file whose only content is ``defaults: [new option]``) is followed."""
    data = yaml.safe_load((CONF / group / f"{option}.yaml").read_text())
    if set(data) == {"defaults"} and len(data["defaults"]) == 1:
        return conf(group, data["defaults"][0])
    return {k: v for k, v in data.items() if k != "defaults"}


# ---------------------------------------------------------------- naming

STUDY = [  # (adv, lip, head) config options -> the study's name; the 14 combinations
    (adv, lip, head, f"{name}{' & tanh' if head == 'tanh' else ''}")
    for adv, lip, name in [("j0", "none", "J0"), ("j0", "lip1", "J0-Lip1"),
                           ("j0", "lip2", "J0-Lip2"), ("j1", "none", "J1"),
                           ("j1", "lip1", "J1-Lip1"), ("j2", "none", "J2"),
                           ("j2", "lip2", "J2-Lip2")]
    for head in ("linear", "tanh")
]


def run_config(adv="j0", lip="none", head="linear", model="resnet34", data="cifar10",
               seed=0, output_dir="/runs/x", **model_fields) -> dict:
    """A resolved run config as results.json stores it, from the conf/ options."""
    return {
        "data": {"_target_": "lipexp.data.datamodule.ImageDataModule",
                 "source": {"_target_": f"lipexp.data.sources.{data}", "_partial_": True},
                 "num_classes": 10, "in_channels": 3, "image_size": 32, "data_dir": "data",
                 "batch_size": 128},
        "model": conf("model", model) | {"num_classes": 10, "in_channels": 3} | model_fields,
        "head": conf("head", head) | ({"num_classes": 10} if head == "tanh" else {}),
        "adv": conf("adv", adv) | {"_partial_": True},
        "lip": conf("lip", lip) | {"_partial_": True},
        "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
        "trainer": {"_target_": "pytorch_lightning.Trainer", "default_root_dir": output_dir,
                    "max_epochs": 200, "enable_progress_bar": False},
        "logger": {"_target_": "pytorch_lightning.loggers.CSVLogger", "save_dir": output_dir},
        "callbacks": {"checkpoint": {"dirpath": f"{output_dir}/checkpoints"}},
        "eval": {"n_images": 1000, "error_at_l2": [0.0, 0.1, 0.5, 1.5],
                 "error_at_linf": [2 / 255, 8 / 255]},
        "paths": {"data_dir": "data", "output_dir": output_dir},
        "seed": seed, "resume": False, "mode": "train", "name": "lipexp",
    }


@pytest.mark.parametrize(("adv", "lip", "head", "name"), STUDY)
def test_defence_name_of_the_study_combinations(adv, lip, head, name):
    assert defence_name(run_config(adv, lip, head)) == name
    assert name in STUDY_ORDER


def test_names_of_models_data_and_runs():
    assert [model_name(run_config(model=m)) for m in
            ("resnet34", "resnext34", "allcnn", "small_cnn", "imagenet_resnet18")] == [
        "resnet34", "resnext34", "allcnn", "small_cnn", "imagenet_resnet18"]
    assert model_name(run_config(model="imagenet_resnet18", depth=34)) == "imagenet_resnet34"
    assert model_name(run_config(model="resnet34", cardinality=4)) == "resnext34"
    assert data_name(run_config(data="cifar100")) == "cifar100"
    assert run_label(run_config("j2", "lip2", "tanh", "resnext34")) == (
        "J2-Lip2 & tanh / resnext34 / seed 0")


def test_unknown_targets_fall_back_to_the_last_component():
    config = run_config("j2", "lip2", "tanh")
    config["adv"]["_target_"] = "mypkg.attacks.pgd_train"
    config["lip"]["_target_"] = "mypkg.penalties.gradient_norm"
    config["head"]["_target_"] = "mypkg.heads.Scaled"
    config["model"] = {"_target_": "mypkg.nets.WideResNet"}
    assert defence_name(config) == "pgd_train-gradient_norm & Scaled"
    assert model_name(config) == "WideResNet"
    for broken in ({}, {"adv": None, "lip": 3, "model": "x", "data": {}}):  # never raises
        assert isinstance(run_label(broken), str)
        assert isinstance(data_name(broken), str)


# ---------------------------------------------------------------- synthetic runs

EPS = [0.0, 0.05, 0.1, 0.5, 1.0, 1.5, 3.0]  # curve grids (real ones: 100 log-spaced sizes)
LINF_EPS = [0.0, 2 / 255, 8 / 255, 16 / 255]


def results_json(config, clean, l2, linf, stab, status="completed", linf_error_at=True):
    """A results.json as run.py writes it (see a real run's file). ``l2 = (median, C on EPS)``,
    ``linf = (median, C on LINF_EPS)``, ``stab = (max l2, max 2inf, max l1, max 11, mean l2)``."""
    out = config["paths"]["output_dir"]

    def attack(norm, median, eps, error, sizes):
        return {"norm": norm, "median": median, "n_unbroken": 0, "n_images": 1000,
                "error_at": {size_key(s): error[eps.index(s)] for s in sizes},
                "curve": {"eps": list(eps), "error": list(error)},  # copies: tests edit them
                "settings": {"attack": "PGDSearch", "norm": norm, "steps": 20}}

    g2, j2, g1, j1, m2 = stab
    return {
        "status": status, "config": config, "output_dir": out,
        "started": "2026-11-25T20:42:37+00:00",
        "provenance": {"lipexp_commit": "0" * 40, "python": "3.11.7"},
        "clean": {"error": clean, "loss": 0.3},
        "data": {"n_train": 50000, "n_test": 10000},
        "evaluation": {"n_images": 1000, "clean_error": clean, "batch_size": 500, "bf16": False},
        "attacks": {
            "l2_pgd": attack("l2", l2[0], EPS, l2[1], [0.0, 0.1, 0.5, 1.5]),
            "linf_pgd": attack("linf", linf[0], LINF_EPS, linf[1],
                               [2 / 255, 8 / 255] if linf_error_at else [2 / 255]),
        },
        "stability": {"grad_loss_l2": {"max": g2, "mean": m2}, "grad_loss_l1": {"max": g1},
                      "jac_2_inf": {"max": j2}, "jac_1_1": {"max": j1},
                      "scale": "per-example norms (the paper's columns divide by 100)"},
        "checks": {"warnings": [], "vanishing_gradient_fraction": 0.0},
        "files": {"figure": f"{out}/error_curves.png"},
        "finished": "2026-11-25T21:42:37+00:00",
    }


def write_run(root: Path, job: str, results: dict | None) -> Path:
    """A Hydra job folder ``root/job`` with .hydra/ and (unless None) results.json."""
    folder = root / job
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    if results is not None:
        write_json_atomic(folder / "results.json", results)  # strict: an inf median is null
    return folder


def cfg(root, job, *args, **kw):
    return run_config(*args, output_dir=str(root / job), **kw)


@pytest.fixture
def sweep(tmp_path):
    """A multirun folder: grid cifar10/resnet34 with J0, J1-Lip1, J2 (l-inf median +inf,
    error at 8/255 only on the curve), J2-Lip2 & tanh (2 seeds); grid cifar10/resnext34 with
    one run; a failed run, a running one and a job folder without results.json."""
    root = tmp_path / "multirun"
    c = {  # job -> (config, clean, l2 median, l2 curve, linf median, linf curve, stability)
        "j0": (cfg(root, "j0"), 0.05, 0.10, [0.05, 0.3, 0.5, 0.9, 1.0, 1.0, 1.0],
               0.004, [0.05, 0.6, 0.9, 1.0], (20.0, 9.0, 700.0, 300.0, 1.5)),
        "j1l1": (cfg(root, "j1l1", "j1", "lip1"), 0.06, 0.30, [0.06, 0.1, 0.2, 0.6, 0.8, 0.9, 1.0],
                 0.012, [0.06, 0.2, 0.4, 0.9], (6.0, 3.0, 200.0, 80.0, 0.5)),
        "j2": (cfg(root, "j2", "j2"), 0.06, 0.25, [0.06, 0.1, 0.2, 0.6, 0.8, 0.9, 1.0],
               INF, [0.06, 0.1, 0.2, 0.3], (5.0, 3.0, 210.0, 70.0, 0.4)),
        "j2l2t_s0": (cfg(root, "j2l2t_s0", "j2", "lip2", "tanh"), 0.06, 0.40,
                     [0.06, 0.08, 0.2, 0.4, 0.6, 0.7, 0.9], 0.010,
                     [0.06, 0.15, 0.3, 0.6], (2.0, 1.0, 100.0, 40.0, 0.2)),
        "j2l2t_s1": (cfg(root, "j2l2t_s1", "j2", "lip2", "tanh", seed=1), 0.08, 0.50,
                     [0.08, 0.10, 0.3, 0.5, 0.6, 0.7, 0.9], 0.014,
                     [0.08, 0.25, 0.4, 0.7], (3.0, 2.0, 140.0, 60.0, 0.3)),
        "x_j0": (cfg(root, "x_j0", model="resnext34"), 0.04, 0.12,
                 [0.04, 0.3, 0.5, 0.9, 1.0, 1.0, 1.0], 0.006, [0.04, 0.5, 0.9, 1.0],
                 (15.0, 7.0, 600.0, 250.0, 1.2)),
    }
    for job, (config, clean, l2m, l2c, lim, lic, stab) in c.items():
        write_run(root, job, results_json(config, clean, (l2m, l2c), (lim, lic), stab,
                                          linf_error_at=job != "j2"))
    failed = {"status": "failed", "config": cfg(root, "j1", "j1"),
              "output_dir": str(root / "j1"), "started": "2026-11-25T20:00:00+00:00",
              "error": "RuntimeError: CUDA out of memory.\nTried to allocate 2 GiB",
              "finished": "2026-11-25T20:01:00+00:00"}
    write_run(root, "j1", failed)
    running = {k: v for k, v in failed.items() if k not in ("error", "finished")}
    write_run(root, "j1l1t", running | {"status": "running",
                                         "config": cfg(root, "j1l1t", "j1", "lip1", "tanh")})
    write_run(root, "j0t", None)  # a job that has not written results.json
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def without_interval(cell: str) -> str:
    """A cell without its " [low, high]" interval."""
    return re.sub(r" \[[^\]]*\]", "", cell)


def tables(markdown: str) -> list[list[list[str]]]:
    """The Markdown tables of ``markdown``: each a list of rows of cells (header first, the
    alignment row dropped)."""
    out, current = [], None
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                out.append(current)
            if not set("".join(cells)) <= set("-:"):
                current.append(cells)
        else:
            current = None
    return out


# ---------------------------------------------------------------- report


def test_report_tables(sweep):
    summary = report(sweep)
    md = (sweep / "report.md").read_text()
    adv, every, stab, x_adv, x_every, x_stab = tables(md)
    assert md.index("## cifar10 / resnet34") < md.index("## cifar10 / resnext34")

    # one row per defence, the study's names and order, n for the two seeds
    assert [r[0] for r in adv[1:]] == ["J0", "J1-Lip1", "J2", "J2-Lip2 & tanh (n=2)"]
    assert [r[0] for r in stab[1:]] == [r[0] for r in adv[1:]]
    assert adv[0][1:] == ["clean error (%)", "best known median l2 distance",
                          "error (%) at l2 0.1", "error (%) at l2 1.5",
                          "best known median l-inf distance", "error (%) at l-inf 8/255"]
    # the numbers of results.json: %, mean ± sample std over the seeds, ∞, curve look-up
    # (J2 has no error_at entry for 8/255 but the size is on its curve: 0.2); bold = best,
    # ties all bold (20.00 at l2 0.1)
    assert adv[1][1:] == ["**5.00**", "0.1", "50.00", "100.00", "0.004 (1.02/255)", "90.00"]
    assert adv[2][1:] == ["6.00", "0.3", "**20.00**", "90.00", "0.012 (3.06/255)", "40.00"]
    assert adv[3][1:] == ["6.00", "0.25", "**20.00**", "90.00", "**∞**", "**20.00**"]
    # two seeds: the 95% t interval of the mean, mean ± t(0.975, 1) std / sqrt(2)
    assert [without_interval(c) for c in adv[4][1:]] == [
        "7.00 ± 1.41", "**0.45 ± 0.07071**", "25.00 ± 7.07", "**70.00 ± 0.00**",
        "0.012 ± 0.002828 (3.06/255)", "35.00 ± 7.07"]
    assert adv[4][1] == "7.00 ± 1.41 [-5.71, 19.71]"
    lipschitz = ["max ‖J‖₂ (lower bound on L)", "L upper bound", "upper / lower",
                 "median certified l2 radius"]
    assert stab[0][1:] == ["max ‖∇ℓ‖₂", "max ‖∇f‖₂,∞", "max ‖∇ℓ‖₁", "max ‖∇f‖₁,₁",
                           "mean ‖∇ℓ‖₂", *lipschitz]
    assert stab[1][1:] == ["20", "9", "700", "300", "1.5", *["—"] * 4]  # not evaluated
    assert [without_interval(c) for c in stab[4][1:]] == [
        "**2.5 ± 0.7071**", "**1.5 ± 0.7071**", "**120 ± 28.28**",
                           "**50 ± 14.14**", "**0.25 ± 0.07071**", *["—"] * 4]
    assert "divided by 100" in md or "values / 100" in md
    # a grid of one run: no comparison, no bold
    assert x_adv[1] == ["J0", "4.00", "0.12", "50.00", "100.00", "0.006 (1.53/255)", "90.00"]
    assert "**" not in "".join(x_stab[1])
    # every attack of the runs: here the two PGDs, the same medians as the first table
    assert every[0][1:] == ["l2_pgd: median l2 distance", "linf_pgd: median l-inf distance"]
    assert every[1:] == [[r[0], r[2], r[5]] for r in adv[1:]]  # bold included
    assert x_every[1] == ["J0", "0.12", "0.006 (1.53/255)"]

    rows = {(r["model"], r["defence"]): r for r in summary["rows"]}
    seeds = rows["resnet34", "J2-Lip2 & tanh"]
    assert seeds["n_seeds"] == 2 and seeds["seeds"] == [0, 1]
    assert seeds["folders"] == ["j2l2t_s0", "j2l2t_s1"]
    assert seeds["stats"]["clean_error"]["mean"] == pytest.approx(0.07)
    assert seeds["stats"]["clean_error"]["std"] == pytest.approx(np.std([0.06, 0.08], ddof=1))
    assert seeds["notes"] == []  # the two seeds differ only in seed and paths
    assert len(summary["rows"]) == 5


def test_report_lists_failed_and_unfinished_runs(sweep):
    summary = report(sweep)
    md = (sweep / "report.md").read_text()
    listed = md[md.index("## Runs not in the tables"):]
    assert "- `j1`: **failed** (J1 / resnet34 / seed 0): RuntimeError: CUDA out of memory. " \
           "Tried to allocate 2 GiB" in listed
    assert "- `j1l1t`: **not finished** (J1-Lip1 & tanh / resnet34 / seed 0)" in listed
    assert "- `j0t`: **not finished**: no results.json" in listed
    assert [f["folder"] for f in summary["failed"]] == ["j1"]
    assert {(f["folder"], f["status"]) for f in summary["unfinished"]} == {
        ("j1l1t", "running"), ("j0t", "missing")}
    # the failed and unfinished runs are in no table
    assert {row[0] for table in tables(md) for row in table[1:]} == {
        "J0", "J1-Lip1", "J2", "J2-Lip2 & tanh (n=2)"}


def test_report_csvs_and_figures(sweep):
    summary = report(sweep)
    files = summary["files"]
    assert Path(files["markdown"]) == sweep.resolve() / "report.md"
    with open(files["adversarial_csv"], newline="") as f:
        adv = list(csv.DictReader(f))
    with open(files["stability_csv"], newline="") as f:
        stab = list(csv.DictReader(f))
    assert [(r["model"], r["defence"], r["n_seeds"]) for r in adv] == [
        ("resnet34", "J0", "1"), ("resnet34", "J1-Lip1", "1"), ("resnet34", "J2", "1"),
        ("resnet34", "J2-Lip2 & tanh", "2"), ("resnext34", "J0", "1")]
    assert all(r["data"] == "cifar10" for r in adv + stab)
    j2, seeds = adv[2], adv[3]
    assert float(j2["linf_median_mean"]) == INF and j2["linf_median_std"] == ""
    assert float(j2[f"linf_error_at_{size_key(8 / 255)}_mean"]) == 0.2
    assert float(seeds["clean_error_mean"]) == pytest.approx(0.07)
    assert float(seeds["l2_median_std"]) == pytest.approx(np.std([0.4, 0.5], ddof=1))
    assert float(seeds["l2_error_at_1.5_mean"]) == pytest.approx(0.7)
    assert seeds["seeds"] == "0 1" and seeds["folders"] == "j2l2t_s0;j2l2t_s1"
    assert float(stab[3]["jac_1_1_max_mean"]) == pytest.approx(50.0)
    assert float(stab[0]["grad_loss_l2_mean_mean"]) == 1.5
    assert stab[0]["grad_loss_l2_mean_std"] == ""  # one seed: no std
    # one figure per grid, loadable
    assert [Path(p).name for p in files["figures"]] == [
        "report_cifar10_resnet34_l2.png", "report_cifar10_resnext34_l2.png"]
    for path in files["figures"]:
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100
    # atomic writes leave no temporary files
    assert not [p for p in sweep.iterdir() if p.name.startswith(".")]


def test_runs_that_trained_differently_are_rows_and_other_differences_notes(tmp_path):
    """Runs named J2-Lip2 with different lambdas (a lambda sweep, a tuning study) are one row
    per lambda, named by it, by increasing value, each with its own seeds; runs of one
    lambda that differ in an evaluation setting stay one row, and the report says so."""
    for job, lam, seed in (("a", 0.3, 0), ("b", 0.1, 0), ("c", 0.1, 1), ("d", 0.1, 1)):
        config = cfg(tmp_path, job, "j2", "lip2", seed=seed)
        config["lip"]["lam"] = lam
        if job == "d":
            config["eval"]["grid_points"] = 7  # how it was evaluated, not trained
        write_run(tmp_path, job, results_json(config, 0.1, (0.2, [0.1] * 7), (0.01, [0.1] * 4),
                                              (1, 1, 1, 1, 1)))
    summary = report(tmp_path)
    rows = {r["defence"]: r for r in summary["rows"]}
    assert list(rows) == ["J2-Lip2 (lip.lam=0.1)", "J2-Lip2 (lip.lam=0.3)"]
    assert rows["J2-Lip2 (lip.lam=0.1)"]["folders"] == ["b", "c", "d"]
    assert rows["J2-Lip2 (lip.lam=0.3)"]["n_seeds"] == 1 and rows["J2-Lip2 (lip.lam=0.3)"][
        "notes"] == []
    assert rows["J2-Lip2 (lip.lam=0.1)"]["notes"] == ["runs differ in `eval.grid_points`",
                                                     "seed 1 occurs more than once"]
    assert "- J2-Lip2 (lip.lam=0.1): runs differ in `eval.grid_points`" in (
        tmp_path / "report.md").read_text()


def test_row_names_show_what_trained_differently_and_only_that(tmp_path):
    """A model width splits rows (``mode``, a changeable key, covers no ``model.*``); a speed
    option, or a key only some runs hold (a setting of a later lipexp), does not; floats
    are shown to 4 significant digits."""
    runs = []
    for job, (lam, width, extra) in enumerate([(0.123456789, 8, {}), (0.123456789, 16, {}),
                                               (0.2, 8, {"new_key": 1}), (0.2, 8, {})]):
        config = cfg(tmp_path, str(job), "j2", "lip2", seed=job)
        config["lip"]["lam"], config["model"]["width"] = lam, width
        config["lip"] |= extra
        config["model"]["channels_last"] = job % 2 == 0
        runs.append(Run(tmp_path / str(job), "completed", {"config": config}))
    (rows,) = group_runs(runs).values()
    assert {k: [r.folder.name for r in v] for k, v in rows.items()} == {
        "J2-Lip2 (lip.lam=0.1235, model.width=8)": ["0"],
        "J2-Lip2 (lip.lam=0.1235, model.width=16)": ["1"],
        "J2-Lip2 (lip.lam=0.2, model.width=8)": ["2", "3"]}
    assert config_notes(rows["J2-Lip2 (lip.lam=0.2, model.width=8)"]) == [
        "runs differ in `lip.new_key`, `model.channels_last`"]
    for run, value in zip(runs, (1, "1", 1, "1")):  # equal once unquoted: shown as JSON
        run.results["config"]["model"] |= {"width": 8, "act": value}
        run.results["config"]["lip"]["lam"] = 0.1
    (rows,) = group_runs(runs).values()
    assert list(rows) == ['J2-Lip2 (model.act=1)', 'J2-Lip2 (model.act="1")']


def test_seed_differences_that_change_no_numbers_are_not_flagged(tmp_path):
    """Seeds may differ in what lipexp.runs.differences.CHANGEABLE allows (evaluation batch
    size, loader workers, logging) and in the recipe; a completed run's max_epochs is how
    long it trained, so a difference there (and in the lambda) is flagged; the run's own
    folder in its strings is not a difference, and an empty section is no key."""
    configs = [cfg(tmp_path, job, "j2", "lip2", seed=seed) for seed, job in enumerate("ab")]
    configs[0]["eval"] |= {"batch_size": 100, "extra": {}}
    configs[1]["eval"] |= {"batch_size": 250}
    configs[1]["data"]["num_workers"] = 4
    configs[1]["logger"] = None
    configs[1]["recipe"] = {"epochs": 100}
    runs = [Run(tmp_path / job, "completed", {"config": c, "output_dir": str(tmp_path / job)})
            for job, c in zip("ab", configs, strict=True)]
    assert config_notes(runs) == []  # the callbacks' and logger's folders differ too
    configs[1]["trainer"]["max_epochs"] = 100
    configs[1]["lip"]["lam"] = 0.3
    assert config_notes(runs) == ["runs differ in `lip.lam`, `trainer.max_epochs`"]
    configs[1]["seed"] = 0
    assert config_notes(runs)[1:] == ["seed 0 occurs more than once"]


def test_missing_statistics_show_a_dash(tmp_path):
    """No l-inf attack, and an l2 curve that has neither 0.1 in error_at nor on its grid."""
    results = results_json(cfg(tmp_path, "a"), 0.1, (0.2, [0.1] * 7), (0.01, [0.1] * 4),
                           (1, 1, 1, 1, 1))
    del results["attacks"]["linf_pgd"]
    l2 = results["attacks"]["l2_pgd"]
    del l2["error_at"]["0.1"]
    l2["curve"]["eps"][2] = 0.11
    write_run(tmp_path, "a", results)
    report(tmp_path)
    adv, _, _ = tables((tmp_path / "report.md").read_text())
    assert adv[1] == ["J0", "10.00", "0.2", "—", "10.00", "—", "—"]


def test_cli(sweep, tmp_path, capsys):
    assert main(["report", str(sweep)]) == 0
    assert str(sweep.resolve() / "report.md") in capsys.readouterr().out
    empty = tmp_path / "empty"
    (empty / "job" / ".hydra").mkdir(parents=True)  # a job folder, but no results.json
    assert main(["report", str(empty)]) != 0
    assert "no results.json" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "absent")]) != 0
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])  # a subcommand is required
    done = subprocess.run([sys.executable, "-m", "lipexp.cli", "report", str(empty)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0 and "no results.json" in done.stderr


def test_report_shows_every_attack_of_the_runs(tmp_path):
    """Attacks beyond the two PGDs, under an old run's name (deepfool) or today's
    (l2_deepfool), one column by today's name: the median of an attack with a curve, the
    error at its one size of a fixed-size attack."""

    def deepfool(median):
        return {"norm": "l2", "median": median, "n_unbroken": 0, "n_images": 1000,
                "error_at": {}, "curve": {"eps": [0.0, 1.0], "error": [0.1, 1.0]},
                "settings": {"attack": "DeepFool"}}

    def autoattack(error):
        return {"norm": "linf", "eps": 8 / 255, "n_images": 1000,
                "error_at": {size_key(8 / 255): error}, "settings": {"attack": "AutoAttack"}}

    runs = {  # job -> (defence options, seed, extra attacks)
        "j0_s0": ((), 0, {"l2_deepfool": deepfool(0.3), "linf_autoattack": autoattack(0.42)}),
        "j0_s1": ((), 1, {"l2_deepfool": deepfool(0.5), "linf_autoattack": autoattack(0.40)}),
        "j2": (("j2",), 0, {"l2_deepfool": deepfool(0.7)}),
    }
    for job, (options, seed, extra) in runs.items():
        results = results_json(cfg(tmp_path, job, *options, seed=seed), 0.1, (0.2, [0.1] * 7),
                               (0.01, [0.1] * 4), (1, 1, 1, 1, 1))
        results["attacks"] |= extra
        write_run(tmp_path, job, results)
    summary = report(tmp_path)

    _, every, _ = tables((tmp_path / "report.md").read_text())
    assert every[0] == ["defence", "l2_pgd: median l2 distance",
                        "linf_pgd: median l-inf distance", "l2_deepfool: median l2 distance",
                        "linf_autoattack: error (%) at l-inf 8/255"]
    assert [r[0] for r in every[1:]] == ["J0 (n=2)", "J2"]
    # one value a column: no bold
    assert [without_interval(c) for c in every[1][3:]] == ["0.4 ± 0.1414", "41.00 ± 1.41"]
    assert every[2][3:] == ["**0.7**", "—"]

    assert summary["files"]["attacks_csv"] == str(tmp_path.resolve() / "report_attacks.csv")
    with open(summary["files"]["attacks_csv"], newline="") as f:
        rows = {(r["defence"], r["attack"]): r for r in csv.DictReader(f)}
    assert set(rows) == (  # no row for an attack that none of a defence's seeds evaluated
        {("J0", a) for a in ("l2_pgd", "linf_pgd", "l2_deepfool", "linf_autoattack")}
        | {("J2", a) for a in ("l2_pgd", "linf_pgd", "l2_deepfool")})
    df = rows["J0", "l2_deepfool"]
    assert (df["data"], df["model"], df["norm"], df["n_seeds"]) == (
        "cifar10", "resnet34", "l2", "2")
    assert float(df["median_mean"]) == pytest.approx(0.4)
    assert float(df["median_std"]) == pytest.approx(np.std([0.3, 0.5], ddof=1))
    assert df["eps"] == df["error_mean"] == ""
    aa = rows["J0", "linf_autoattack"]
    assert float(aa["eps"]) == 8 / 255 and aa["median_mean"] == ""
    assert float(aa["error_mean"]) == pytest.approx(0.41)
    assert float(rows["J2", "l2_deepfool"]["median_mean"]) == 0.7
    assert rows["J2", "l2_deepfool"]["median_std"] == ""  # one seed: no std
    j0 = next(r for r in summary["rows"] if r["defence"] == "J0")
    assert j0["attacks"]["linf_autoattack"]["eps"] == 8 / 255
    assert j0["attacks"]["l2_deepfool"]["n"] == 2  # both seeds, under either name


def test_runs_of_lipexp_0_1_are_reported_with_todays(make_cfg, tmp_path):
    """A results.json written by lipexp 0.1 (tests/fixtures: adv=fgsm lip=l1, attacks l2_pgd,
    linf_pgd and deepfool) and today's run of the same settings (seed 1) are one defence
    with two seeds, without spurious "runs differ" notes, and deepfool is one attack."""
    from lipexp.runs.train import run

    old = json.loads((FIXTURES / "results_lipexp_0.1.json").read_text())
    write_run(tmp_path, "old", old)
    run(make_cfg("adv=j1", "lip=lip1", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                 "eval.n_images=20", "attacks=[l2_pgd,linf_pgd,l2_deepfool]",
                 "attacks.l2_pgd.steps=3", "attacks.linf_pgd.steps=3", "attacks.l2_pgd.targets=1",
                 "attacks.linf_pgd.targets=1", "eval.grid_points=8", "model.width=8",
                 "eval.lipschitz=false", "logger=none", "seed=1", output_dir=tmp_path / "new"))
    summary = report(tmp_path)
    (row,) = summary["rows"]
    assert row["defence"] == "J1-Lip1 & tanh" and row["n_seeds"] == 2 and row["seeds"] == [0, 1]
    # the differences: lipexp 0.4's cheaper PGD search (lipexp 0.1 ran l2_pgd_full's settings,
    # which the note names); the fixture's model summary setting is CHANGEABLE: not named
    assert row["notes"] == ["runs differ in " + ", ".join(
        f"`attacks.{a}.{k}`" for a in ("l2_pgd", "linf_pgd")
        for k in ("early_stop", "factor", "target_order"))]
    assert set(row["attacks"]) == {"l2_pgd", "linf_pgd", "l2_deepfool"}
    assert row["attacks"]["l2_deepfool"]["n"] == 2


def test_the_stability_table_shows_the_lipschitz_analysis(tmp_path):
    """Lower bound, upper bound, their ratio and the certified median per defence; the best
    (lowest constants, largest radius) in bold."""
    for job, options, (lower, upper, radius) in [("j0", (), (2.0, 900.0, 0.001)),
                                                 ("j2", ("j2", "lip2"), (0.5, 300.0, 0.004))]:
        results = results_json(cfg(tmp_path, job, *options), 0.1, (0.2, [0.1] * 7),
                               (0.01, [0.1] * 4), (1, 1, 1, 1, 1))
        results["lipschitz"] = {"upper_bound_l2": upper, "ratio": upper / lower,
                                "empirical_l2": {"jacobian_max": lower},
                                "certified": {"l2": {"median": radius}}}
        write_run(tmp_path, job, results)
    report(tmp_path)
    _, _, stab = tables((tmp_path / "report.md").read_text())  # adversarial, every attack
    assert [row[0] for row in stab[1:]] == ["J0", "J2-Lip2"]
    assert stab[1][6:] == ["2", "900", "**450**", "0.001"]  # the tighter bracket
    assert stab[2][6:] == ["**0.5**", "**300**", "600", "**0.004**"]
