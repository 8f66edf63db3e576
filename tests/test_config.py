"""Every config choice composes and builds; wrong values are refused before any data loads."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lipexp.config import validate
from lipexp.deprecations import RENAMED_CHOICES, chosen_options, notices

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["data", "model", "head", "adv", "lip", "recipe", "optimizer", "scheduler", "trainer",
          "logger"]
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(f.stem for f in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(make_cfg, group, option):
    cfg = make_cfg(f"{group}={option}")
    validate(cfg)
    assert OmegaConf.select(cfg, group) is not None


@pytest.mark.parametrize("option", sorted(f.stem for f in (CONF / "model").glob("*.yaml")))
def test_every_model_option_builds_for_its_data(make_cfg, option):
    data = "digits" if option == "small_cnn" else "cifar10"
    cfg = make_cfg(f"model={option}", f"data={data}")
    model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_defaults_are_j2_lip2_tanh_on_digits(make_cfg):
    cfg = make_cfg()
    choices = {"adv": cfg.adv._target_, "lip": cfg.lip._target_, "head": cfg.head._target_}
    assert choices == {
        "adv": "lipexp.defences.adversarial.l2_gradient_step",
        "lip": "lipexp.defences.lipschitz.penalized_cross_entropy",
        "head": "lipexp.models.heads.TanhHead",
    }
    assert cfg.lip.dual_norm == 2 and cfg.lip.lam == 0.1 and cfg.adv.eps == 0.01
    assert cfg.data.source._target_ == "lipexp.data.sources.digits"


@pytest.mark.parametrize(
    "data,epochs,milestones,gamma,decay",
    [("cifar10", 200, [60, 120, 180], 0.2, 5e-4), ("cifar100", 300, [150, 225], 0.1, 1e-4)],
)
def test_recipe_follows_the_data_set(make_cfg, data, epochs, milestones, gamma, decay):
    """docs/method.md's recipe; SGD weight decay is twice the loss-term decay."""
    cfg = make_cfg(f"data={data}", "model=allcnn")
    assert cfg.trainer.max_epochs == epochs
    assert list(cfg.scheduler.milestones) == milestones and cfg.scheduler.gamma == gamma
    assert cfg.optimizer.lr == 0.1 and cfg.optimizer.momentum == 0.9
    assert cfg.optimizer.weight_decay == pytest.approx(2 * decay)
    assert cfg.data.batch_size == 128


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_presets(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}")
    validate(cfg)
    data, model = experiment.rsplit("_", 1) if "small_cnn" not in experiment else (
        experiment.removesuffix("_small_cnn"), "small_cnn")
    assert cfg.data.source._target_ == f"lipexp.data.sources.{data}"
    assert cfg.trainer.accelerator == "gpu"
    instantiate(cfg.model)  # builds with the data's classes and channels
    if experiment == "cifar100_resnext34":
        assert cfg.model.cardinality == 4 and cfg.data.num_classes == 100
    if experiment == "cifar10_resnext34":
        assert cfg.model.cardinality == 2
    if data.startswith("cifar"):
        assert cfg.data.cutout == (16 if data == "cifar10" else 8)


def test_overrides_reach_the_objects(make_cfg):
    cfg = make_cfg("adv=j1", "adv.eps=0.05", "lip=lip1", "lip.lam=0.3", "lip.scaling=per_example",
                   "lip.target=1.5", "head=linear")
    perturb, objective = instantiate(cfg.adv), instantiate(cfg.lip)
    assert perturb.keywords == {"eps": 0.05, "clip": True}
    assert objective.keywords["lam"] == 0.3 and objective.keywords["dual_norm"] == 1
    assert objective.keywords["lam_over_sqrt_n"] is True and objective.keywords["target"] == 1.5
    assert objective.keywords["scaling"] == "per_example"


@pytest.mark.parametrize(
    "override,error,message",
    [
        ("adv=pgd", MissingConfigException, "Available options in 'adv'"),
        ("lip=l3", MissingConfigException, "Available options in 'lip'"),
        ("adv.epss=0.1", ConfigCompositionException, "adv.epss"),
        ("+adv.epss=0.1", ValueError, "adv.epss is not a setting of adv"),
        ("+optimizer.lrr=0.1", ValueError, "optimizer.lrr is not an argument of torch.optim.SGD"),
        ("+lip.lamda=0.1", ValueError, "lip.lamda is not a setting of lip"),
        ("+seeds=3", ValueError, "seeds is not a setting of the config"),
        ("adv.eps=abc", ConfigCompositionException, "adv.eps"),
        ("lip.scaling=sum", ConfigCompositionException, "lip.scaling"),
        ("adv.eps=-0.1", ValueError, "adv.eps must be >= 0"),
        ("lip.lam=-1", ValueError, "lip.lam must be >= 0"),
        ("lip.dual_norm=3", ValueError, "lip.dual_norm must be 1"),
        ("+lip.norm=1", ValueError, "renamed: use lip.dual_norm"),
        ("recipe.epochs=0", ValueError, "recipe.epochs must be >= 1"),
        ("recipe.milestones=[20,10]", ValueError, "recipe.milestones must be increasing"),
        ("lip.target=-1", ValueError, "lip.target"),
        # raised by the constructor, wrapped by hydra's InstantiationException
        ("data.batch_size=0", InstantiationException, "data.batch_size must be > 0"),
    ],
)
def test_bad_values_are_refused_with_a_message(make_cfg, override, error, message):
    """Refused by validate or, for groups checked by their constructors (data, models,
    attacks), when the run builds its objects; both come before any data is read."""
    from lipexp.build import build_datamodule, build_evaluator, build_module

    def validate_and_build(cfg):
        validate(cfg)
        build_module(cfg), build_datamodule(cfg), build_evaluator(cfg)

    with pytest.raises(error) as info:
        validate_and_build(make_cfg(override))
    text = str(info.value) + str(info.value.__cause__ or "")
    assert message in text


def test_none_options_take_no_size(make_cfg):
    with pytest.raises(ConfigCompositionException):
        make_cfg("adv=j0", "adv.eps=0.1")
    with pytest.raises(ConfigCompositionException):
        make_cfg("lip=none", "lip.lam=0.1")


def test_run_folder_names_are_deterministic_and_bounded():
    from lipexp.resolvers import run_dirname

    assert run_dirname("") == "default"
    assert run_dirname("adv=fgsm,data.data_dir=/a/b") == "adv=fgsm,data.data_dir=_a_b"
    long = ",".join(f"key{i}=value{i}" for i in range(40))
    other = long.replace("value39", "value38")
    assert run_dirname(long) == run_dirname(long) and len(run_dirname(long)) <= 120
    assert run_dirname(long) != run_dirname(other)  # same start, different runs


def test_the_recipe_printed_by_cfg_job_is_what_runs(make_cfg):
    """``python run.py --cfg job --resolve`` prints the epochs, lr and milestones that the
    Trainer, the optimizer and the scheduler actually receive."""
    import subprocess
    import sys

    import yaml

    from lipexp.build import build_module, build_trainer

    from .conftest import REPO

    printed = yaml.safe_load(subprocess.run(
        [sys.executable, "run.py", "--cfg", "job", "--resolve"], cwd=REPO, check=True,
        capture_output=True, text=True, timeout=120).stdout)
    cfg = make_cfg()
    module = build_module(cfg)
    trainer = build_trainer(cfg, module, [])
    optimizer_and_scheduler = module.configure_optimizers()
    optimizer = optimizer_and_scheduler["optimizer"]
    scheduler = optimizer_and_scheduler["lr_scheduler"]
    assert trainer.max_epochs == printed["trainer"]["max_epochs"] == printed["recipe"]["epochs"]
    assert optimizer.defaults["lr"] == printed["optimizer"]["lr"] == printed["recipe"]["lr"]
    assert optimizer.defaults["weight_decay"] == printed["optimizer"]["weight_decay"]
    assert sorted(scheduler.milestones) == printed["scheduler"]["milestones"] == (
        printed["recipe"]["milestones"])
    assert scheduler.gamma == printed["scheduler"]["gamma"]
    # the numbers are the digits recipe's, the file that README points to
    recipe = yaml.safe_load((CONF / "recipe" / "digits.yaml").read_text())
    assert printed["recipe"] == {k: v for k, v in recipe.items() if k != "defaults"}


def test_trainer_options_share_one_file_of_settings(make_cfg):
    """cpu, gpu and ddp differ from trainer/default.yaml only where they must."""
    base = OmegaConf.to_container(make_cfg("trainer=default").trainer, resolve=True)
    for option, own in [("cpu", {"accelerator"}), ("gpu", {"accelerator"}),
                        ("ddp", {"accelerator", "devices", "strategy"})]:
        trainer = OmegaConf.to_container(make_cfg(f"trainer={option}").trainer, resolve=True)
        differing = {k for k in trainer.keys() | base.keys() if trainer.get(k) != base.get(k)}
        assert differing == own, option


DEPRECATED = [(group, old, new) for group, renamed in RENAMED_CHOICES.items()
              for old, new in renamed.items()]


@pytest.mark.parametrize("group,old,new", DEPRECATED,
                         ids=[f"{g}={o}" for g, o, _ in DEPRECATED])
def test_a_deprecated_spelling_composes_as_the_new_one_with_a_notice(make_cfg, group, old, new):
    if group == "attacks":  # the alias keeps the old key, so old settings overrides still work
        old_cfg, new_cfg = make_cfg(f"attacks=[{old}]"), make_cfg(f"attacks=[{new}]")
        assert list(old_cfg.attacks) == [old] and list(new_cfg.attacks) == [new]
        assert old_cfg.attacks[old] == new_cfg.attacks[new]
        instantiate(old_cfg.attacks[old])
    else:
        old_cfg, new_cfg = make_cfg(f"{group}={old}"), make_cfg(f"{group}={new}")
        assert old_cfg == new_cfg
    chosen = chosen_options({"adv": "j2", "lip": "lip2"} | (
        {} if group == "attacks" else {group: old}), [f"attacks=[l2_pgd,{old}]"]
        if group == "attacks" else [f"{group}={old}"])
    (notice,) = notices(chosen)
    assert f"{group}={old} is deprecated: use {group}={new}" in notice
    assert notices(chosen_options({group: new}, [])) == []  # the new spelling: no notice
