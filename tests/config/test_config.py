"""Every config choice composes and builds; wrong values are refused before any data loads."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lipexp.config.schema import validate

from ..helpers import REPO

CONF = REPO / "conf"
GROUPS = ["data", "model", "head", "adv", "lip", "defence", "recipe", "optimizer", "scheduler",
          "trainer", "logger"]
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(f.stem for f in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(make_cfg, group, option):
    cfg = make_cfg(f"{group}={option}")
    validate(cfg)
    if group == "defence":  # adv and lip as its name says (defence=j0_lip1: adv=j0 lip=lip1)
        adv, _, lip = option.partition("_")
        assert cfg == make_cfg(f"adv={adv}", f"lip={lip or 'none'}")
    else:
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
        "lip": "lipexp.defences.penalty.penalized_cross_entropy",
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
    from lipexp.runs.build import build_datamodule, build_evaluator, build_module

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
    from lipexp.config.resolvers import run_dirname

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

    from lipexp.runs.build import build_module, build_trainer

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
    # the numbers are the digits recipe's, the file that docs/configuration.md points to
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


def test_the_default_defence_is_the_default_adv_and_lip_and_the_command_line_wins(make_cfg):
    """conf/config.yaml's defence (j2_lip2) says what its adv and lip say, and an adv=... or
    lip=... on the command line wins over a defence's choice, in either order."""
    assert make_cfg() == make_cfg("defence=j2_lip2")
    j0_lip1 = make_cfg("adv=j0", "lip=lip1")
    assert make_cfg("defence=j0", "lip=lip1") == make_cfg("lip=lip1", "defence=j0") == j0_lip1
    assert make_cfg("defence=j0_lip1") == j0_lip1
    assert make_cfg("defence=j2_lip2", "adv=j1").adv == make_cfg("adv=j1").adv


def run_folder(*overrides: str) -> str:
    """``hydra.run.dir`` of ``python run.py OVERRIDES``, composed as run.py composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra.run.dir


# one run (the default: J2-Lip2 & tanh, lam 0.1) spelled in several ways, and with settings
# that may change without changing its numbers
ONE_RUN = [(), ("adv=j2", "lip=lip2", "head=tanh"), ("defence=j2_lip2", "head=tanh"),
           ("head=tanh", "defence=j2_lip2"), ("lip.dual_norm=2",), ("lip.lam=0.1", "adv.eps=0.01"),
           ("attacks=[linf_fmn,l2_pgd,l2_fmn,linf_pgd]",), ("logger=none", "name=other",
                          "eval.batch_size=7", "resume=true")]


def test_every_spelling_of_one_run_names_one_folder():
    folders = {run_folder(*spelling) for spelling in ONE_RUN}
    assert len(folders) == 1
    (folder,) = folders
    assert folder.startswith("outputs/J2-Lip2_tanh.digits.small_cnn.seed0.")
    # other runs: other folders (the seed in the name; the rest in the hash)
    others = [run_folder(o) for o in ("lip.lam=0.3", "seed=1", "head=linear", "defence=j0",
                                      "adv.eps=0.02", "eval.n_images=20", "attacks=[l2_pgd]",
                                      "+trainer.limit_train_batches=2")]
    assert len({folder, *others}) == len(others) + 1
    assert others[1] == folder.replace(".seed0.", ".seed1.")  # the seed is not in the hash
    assert others[3].startswith("outputs/J0_tanh.digits.small_cnn.seed0.")


def test_the_folder_name_is_the_run_name_of_the_recorded_config(make_cfg, tmp_path):
    """The name Hydra resolves is ``run_name`` of the config that results.json records (plain,
    resolved), so a folder can be checked against its results."""
    from lipexp.config.identity import run_name
    from lipexp.config.schema import as_plain_dict

    for overrides in [(), ("defence=j1_lip1", "data=mnist", "model=allcnn", "seed=3"),
                      ("lip.scaling=per_example", "lip.method=fd")]:
        name = Path(run_folder(f"paths.output_dir={tmp_path}", *overrides)).name
        assert name == run_name(as_plain_dict(make_cfg(*overrides)))


def test_an_evaluation_keeps_its_own_folder_and_mode_is_gone(tmp_path):
    """evaluate.py's root config makes no Hydra folder; its evaluation's folder is
    <run>/eval/<attacks>-<time> beside the checkpoint's run. run.py has no mode switch."""
    from hydra.errors import ConfigCompositionException

    from lipexp.config.resolvers import eval_dirname
    from lipexp.config.root import compose

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    cfg = compose("evaluate", [f"ckpt_path={ckpt}"], return_hydra_config=True)
    assert cfg.hydra.run.dir == "." and cfg.paths.output_dir is None
    folder = Path(eval_dirname(cfg.ckpt_path, ["l2_pgd"], "20261207-000000"))
    assert folder == tmp_path / "run" / "eval" / "l2_pgd-20261207-000000"
    with pytest.raises(ConfigCompositionException):
        run_folder("mode=eval")
