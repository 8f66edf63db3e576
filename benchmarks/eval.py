"""Evaluation benchmark: images/s and network passes per image of each evaluation attack,
as lipexp runs them (lipexp.evaluation.evaluate, conf/attacks/), README "Speed".

For each model x protocol: the attacks' wall seconds, images/s, forward and backward passes
per image (counted by hooks, lipexp/evaluation/cost.py) and median distance. Protocols:

- ``default``: attacks=[l2_pgd,linf_pgd], the evaluation every run ends with;
- ``full``: attacks=[l2_pgd_full,linf_pgd_full], lipexp 0.3's protocol (about 4x the passes);
- ``fmn``: attacks=[l2_fmn,linf_fmn], the minimal-norm attack.

Models: the study's ResNet-34 on CIFAR-shaped images and the small CNN on MNIST-shaped ones,
random weights on random images labelled by the model (every image correct clean), or a
trained run's network and test images with ``--checkpoint``. Passes per image depend on
the model (how far its boundaries are from the first-order estimate): compare protocols on
one model, and use a trained checkpoint for numbers to cite. Writes one JSON file
(``benchmarks/results/eval_<device>.json``) and prints a Markdown table.

    python benchmarks/eval.py                                   # CPU: 2 threads, few images
    python benchmarks/eval.py --checkpoint outputs/RUN/checkpoints/last.ckpt --images 300
    python benchmarks/eval.py --device cuda --images 10000 --batch-size 1000 --bf16
"""

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lipexp.files import write_json_atomic  # noqa: E402
from lipexp.runs.provenance import machine  # noqa: E402

MODELS = {"small_cnn": ("mnist", (1, 28, 28)), "resnet34": ("cifar10", (3, 32, 32))}
PROTOCOLS = {"default": ["l2_pgd", "linf_pgd"], "full": ["l2_pgd_full", "linf_pgd_full"],
             "fmn": ["l2_fmn", "linf_fmn"]}


def compose(overrides: list[str]):
    from lipexp.config.root import compose as compose_root

    return compose_root("config", overrides)


def attacks_of(protocol: str):
    from hydra.utils import instantiate

    cfg = compose([f"attacks=[{','.join(PROTOCOLS[protocol])}]"])
    return instantiate(cfg.attacks, _convert_="partial")


def random_problem(model: str, n: int, device: torch.device, seed: int = 0):
    """The model with random weights and ``n`` random smooth images (4x4 noise, upsampled)
    labelled by it. A random deep network maps every such image to one class, far from any
    boundary, so it is centred on the images: its batch-norm statistics are theirs (one
    pass in train mode), and the last layer's bias subtracts their mean logits."""
    from lipexp.runs.build import build_module

    data, shape = MODELS[model]
    cfg = compose([f"data={data}", f"model={model}", "adv=j0", "lip=none", "head=linear",
                   "eval.lipschitz=false"])
    torch.manual_seed(seed)
    net = build_module(cfg).net.to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, shape[0], 4, 4, generator=g),
                                        size=shape[1:], mode="bilinear").to(device)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
    with torch.no_grad():
        net.train()
        for i in range(0, n, 256):
            net(x[i:i + 256])
        net.eval()
        last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias -= torch.cat([net(x[i:i + 256]) for i in range(0, n, 256)]).mean(0)
        y = torch.cat([net(x[i:i + 256]).argmax(1) for i in range(0, n, 256)])
    return net, x, y


def trained_problem(path: str, n: int, device: torch.device):
    """A trained run's network and its first ``n`` test images."""
    from omegaconf import OmegaConf

    from lipexp.runs.build import build_datamodule, build_module
    from lipexp.runs.checkpoint import load_run_checkpoint, load_weights

    checkpoint = load_run_checkpoint(path)
    cfg = OmegaConf.create(checkpoint.config)
    module = build_module(cfg, training=False)  # a checkpoint evaluated: no trainer checks
    load_weights(module, checkpoint)
    data = build_datamodule(cfg)
    data.setup("test")
    x, y = data.test_set()
    return module.net.to(device).eval(), x[:n].to(device), y[:n].to(device)


def run_one(net, x, y, protocol: str, args) -> list[dict]:
    from lipexp.attacks.threat import Norm
    from lipexp.evaluation.evaluate import evaluate

    start = time.perf_counter()
    ev = evaluate(net, x, y, attacks_of(protocol), error_at_sizes={n: [] for n in Norm},
                  batch_size=args.batch_size, bf16=args.bf16, progress=args.progress)
    total = time.perf_counter() - start
    rows = []
    for name, cost in ev.results["evaluation"]["cost"].items():
        rows.append({"protocol": protocol, "attack": name, "images": len(x), **cost,
                     "median": ev.results["attacks"][name]["median"],
                     "evaluation_seconds": total})
    return rows


def table(results: list[dict]) -> str:
    lines = ["| model | attack | images | seconds | images/s | forward/image | backward/image"
             " | median |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['attack']} | {r['images']} | {r['seconds']:.1f} | "
                     f"{r['images_per_s'] or 0:.1f} | {r['forward_per_image']:.0f} | "
                     f"{r['backward_per_image']:.0f} | {r['median']:.4g} |")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small_cnn,resnet34",
                   help=f"comma-separated, of {list(MODELS)} (ignored with --checkpoint)")
    p.add_argument("--protocols", default="default,fmn", help=f"comma-separated, of "
                   f"{list(PROTOCOLS)} (full: about 4x default's time)")
    p.add_argument("--checkpoint", default=None, help="a trained run's checkpoint")
    p.add_argument("--images", type=int, default=None,
                   help="images per model (default: 64 on CPU, 10000 on GPU)")
    p.add_argument("--small-cnn-images", type=int, default=None,
                   help="images for the small CNN (default: --images, 4x on CPU)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="attacks under bf16 autocast")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--progress", action="store_true", help="a progress bar per attack")
    p.add_argument("--out", default=None, help="the JSON file (default: "
                   "benchmarks/results/eval_<device>[_bf16].json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = args.images or (64 if args.device == "cpu" else 10000)
    problems = {}
    if args.checkpoint:
        problems["checkpoint"] = lambda: trained_problem(args.checkpoint, images, device)
    else:
        for model in args.models.split(","):
            n = images if model != "small_cnn" else (
                args.small_cnn_images or (4 * images if args.device == "cpu" else images))
            problems[model] = lambda model=model, n=n: random_problem(model, n, device)
    results = []
    for model, make in problems.items():
        net, x, y = make()
        for protocol in args.protocols.split(","):
            for row in run_one(net, x, y, protocol, args):
                results.append({"model": model, **row})
                print(f"{model} {row['attack']}: {row['images_per_s'] or 0:.1f} images/s, "
                      f"{row['forward_per_image']:.0f} forward passes per image", flush=True)
    report = {"machine": machine(args.device), "device": args.device, "torch": torch.__version__,
              "bf16": args.bf16, "batch_size": args.batch_size,
              "checkpoint": args.checkpoint, "results": results}
    out = Path(args.out or REPO / "benchmarks" / "results" /
               f"eval_{args.device}{'_bf16' if args.bf16 else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)  # strict JSON: an infinite median is null
    print(table(results))
    print(f"written: {out}")
    return report


if __name__ == "__main__":
    main()
