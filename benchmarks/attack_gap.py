"""Attack-steps benchmark: do more PGD or FMN steps close the gap between the attacks'
medians (issue 22), and what the default evaluation (PGD + FMN per norm) costs.

On trained models (tiny runs of ``python run.py`` on the embedded digits, or
``--checkpoint``), each norm's PGD size search (conf/attacks/<norm>_pgd.yaml) and FMN
(<norm>_fmn.yaml) run with several step counts, set as the command line would set them
(``attacks.l2_pgd.steps=20``), all in one ``lipexp.evaluation.evaluate`` call. Per norm,
the best known distance of each image is then the minimum over ALL the variants
(lipexp/evaluation/ensemble.py), and each variant gets its median, forward and backward
passes per image (hooks, lipexp/evaluation/cost.py), seconds, its median's gap to the best
median (``median / best_median - 1``) and its optimality (intervals.optimality). So does
the default pair (PGD-10 + FMN-25, the per-image minimum of the two: the headline of every
run), whose forward passes per image and norm are compared with the evaluation's goal of
at most 520. Writes one JSON file (``benchmarks/results/attack_gap_<device>.json``) and
prints its Markdown table (benchmarks/tables.py renders it into docs/benchmarks.md).

    python benchmarks/attack_gap.py                       # trains J2-Lip2 & tanh and J0, CPU
    python benchmarks/attack_gap.py --checkpoint outputs/RUN/checkpoints/last.ckpt --images 360
    python benchmarks/attack_gap.py --pgd-steps 10,100 --fmn-steps 25,200
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lipexp.files import write_json_atomic  # noqa: E402
from lipexp.runs.provenance import machine  # noqa: E402

GOAL_FORWARD = 520  # the evaluation's cost goal: forward passes per image and norm
NORMS = ("l2", "linf")
# the trained models: a name and run.py's overrides (the default run is J2-Lip2 & tanh)
MODELS = {"j2lip2_tanh": [], "j0": ["defence=j0", "head=linear"]}
# the tiny runs' own end-of-run evaluation, kept short (this benchmark does the measuring)
TRAIN_OVERRIDES = ["logger=none", "eval.n_images=50", "eval.lipschitz=false",
                   "eval.pictures=0", "eval.progress=false"]


def bench(name: str):
    """benchmarks/<name>.py as a module (eval.py's problems, tables.py's table)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(name: str, overrides: list[str], epochs: int, root: Path, threads: int
          ) -> tuple[Path, dict]:
    """A tiny run of run.py in ``root/name`` (``threads`` torch threads on the CPU): its last
    checkpoint and clean test error."""
    out = root / name
    command = [sys.executable, "run.py", f"recipe.epochs={epochs}", *TRAIN_OVERRIDES,
               f"hydra.run.dir={out}", *overrides]
    print("training:", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    results = json.loads((out / "results.json").read_text())
    return out / "checkpoints" / "last.ckpt", {"overrides": command[2:],
                                               "clean_error": results["clean"]["error"]}


def variants(ev, pgd_steps: list[int], fmn_steps: list[int]) -> tuple[dict, dict]:
    """The attacks ``<norm>_<pgd|fmn>_<steps>`` of conf/attacks with ``steps`` overridden,
    and the default config's step counts ``{"pgd": 10, "fmn": 25}``."""
    from hydra.utils import instantiate

    kinds = {"pgd": pgd_steps, "fmn": fmn_steps}
    default = ev.compose([]).attacks  # the default evaluation: PGD and FMN of each norm
    defaults = {kind: int(default[f"l2_{kind}"].steps) for kind in kinds}
    assert all(int(default[f"{n}_{k}"].steps) == defaults[k] for n in NORMS for k in kinds)
    counts = {kind: sorted({*steps, defaults[kind]}) for kind, steps in kinds.items()}
    configs = {}  # (kind, steps) -> both norms' attack configs
    for kind in kinds:
        names = [f"{norm}_{kind}" for norm in NORMS]
        for steps in counts[kind]:
            configs[kind, steps] = ev.compose([f"attacks=[{','.join(names)}]", *(
                f"attacks.{name}.steps={steps}" for name in names)]).attacks
    attacks = {f"{norm}_{kind}_{steps}": instantiate(configs[kind, steps][f"{norm}_{kind}"],
                                                     _convert_="partial")
               for norm in NORMS for kind in kinds for steps in counts[kind]}
    return attacks, defaults


def measure(net, x, y, attacks: dict, defaults: dict, args) -> tuple[list, list]:
    """Every variant's row and each norm's default-pair row of one model."""
    from lipexp.attacks.threat import Norm
    from lipexp.evaluation.curves import median_distance
    from lipexp.evaluation.evaluate import evaluate
    from lipexp.evaluation.intervals import optimality

    out = evaluate(net, x, y, attacks, error_at_sizes={n: [] for n in Norm},
                   batch_size=args.batch_size, progress=args.progress)
    cost, rows, pairs = out.results["evaluation"]["cost"], [], []
    for norm in NORMS:
        ens = out.results["ensemble"][norm]
        best, best_median = out.distances[f"ensemble_{norm}"], ens["median"]
        names = [a for a in attacks if a.startswith(f"{norm}_")]
        for a in names:
            kind, steps = a.split("_")[1], int(a.rsplit("_", 1)[1])
            rows.append({"norm": norm, "attack": f"{norm}_{kind}", "steps": steps,
                         "default": steps == defaults[kind], "images": len(x),
                         "median": out.results["attacks"][a]["median"],
                         "gap": ens["gap"][a], "optimality": ens["optimality"][a],
                         "best_count": ens["best_count"][a],
                         **{k: cost[a][k] for k in ("forward_per_image", "backward_per_image",
                                                    "seconds")}})
        pair = [f"{norm}_{kind}_{defaults[kind]}" for kind in ("pgd", "fmn")]
        d = np.minimum(*(out.distances[a] for a in pair))
        median = median_distance(d)
        forward = sum(cost[a]["forward_per_image"] for a in pair)
        pairs.append({"norm": norm, "attacks": pair, "images": len(x), "median": median,
                      "gap": median / best_median - 1.0 if 0 < best_median < np.inf else None,
                      "optimality": optimality(d, best), "best_median": best_median,
                      "forward_per_image": forward,
                      "backward_per_image": sum(cost[a]["backward_per_image"] for a in pair),
                      "seconds": sum(cost[a]["seconds"] for a in pair),
                      "within_goal": forward <= GOAL_FORWARD,
                      "all_forward_per_image": sum(cost[a]["forward_per_image"] for a in names)})
    return rows, pairs


def steps_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", default=[],
                   help="a trained run's checkpoint (repeatable; default: train the tiny runs)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"the tiny runs to train, comma-separated, of {list(MODELS)}")
    p.add_argument("--epochs", type=int, default=5, help="epochs of each tiny run")
    p.add_argument("--train-dir", default=None,
                   help="where the tiny runs go (default: a new temporary folder, kept)")
    p.add_argument("--images", type=int, default=200, help="test images per model")
    p.add_argument("--pgd-steps", type=steps_list, default=[10, 20, 50],
                   help="PGD steps per size, comma-separated (the default's always runs)")
    p.add_argument("--fmn-steps", type=steps_list, default=[25, 50, 100],
                   help="FMN steps per run, comma-separated (the default's always runs)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads on CPU (the tiny runs' too)")
    p.add_argument("--progress", action="store_true", help="a progress bar per attack")
    p.add_argument("--out", default=None, help="the JSON file (default: "
                   "benchmarks/results/attack_gap_<device>.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ev, tables = bench("eval"), bench("tables")
    models = {Path(c).resolve().parent.parent.name: (Path(c), None) for c in args.checkpoint}
    if not models:
        root = Path(args.train_dir or tempfile.mkdtemp(prefix="attack_gap_"))
        for name in args.models.split(","):
            models[name] = train(name, MODELS[name], args.epochs, root, args.threads)
    attacks, defaults = variants(ev, args.pgd_steps, args.fmn_steps)
    results, pairs = [], []
    for model, (checkpoint, training) in models.items():
        net, x, y = ev.trained_problem(str(checkpoint), args.images, device)
        rows, model_pairs = measure(net, x, y, attacks, defaults, args)
        results += [{"model": model, **r} for r in rows]
        pairs += [{"model": model, "checkpoint": str(checkpoint), "training": training, **p}
                  for p in model_pairs]
        for p in model_pairs:
            print(f"{model} {p['norm']}: default pair {p['median']:.4g} ({p['gap']:+.2%} of the "
                  f"best), {p['forward_per_image']:.0f} forward passes per image", flush=True)
    report = {"machine": machine(args.device), "device": args.device, "torch": torch.__version__,
              "batch_size": args.batch_size, "images": args.images,
              "goal_forward_per_image": GOAL_FORWARD, "default_steps": defaults,
              "gaps": results, "default_pairs": pairs}
    out = Path(args.out or REPO / "benchmarks" / "results" / f"attack_gap_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)  # strict JSON: an infinite median is null
    print("\n".join(tables.attack_gap_tables(out.name, report)))
    print(f"written: {out}")
    return report


if __name__ == "__main__":
    main()
