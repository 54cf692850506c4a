"""The ``accelprune`` command: ``demo``, ``prune`` and ``bench``.

Bad arguments give a one-line message and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

BENCHMARKS = ("ward", "coverage", "kernels", "reprune", "csgd")


class UsageError(Exception):
    """A problem with what the user asked for; reported without a traceback."""


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,3,224,224, got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected a batch and at least one more positive dim, got {text!r}")
    return shape


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from accelprune.pruning import METHODS

    parser = argparse.ArgumentParser(prog="accelprune",
                                     description="Structured pruning for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train ResNet-20 on digits and prune it four ways")
    demo.add_argument("--out", default="demo_out", help="folder for demo.json and the plots")
    demo.add_argument("--budget", type=_fraction, default=0.5, help="fraction of MACs to remove")
    demo.add_argument("--epochs", type=int, default=None,
                      help="training epochs of the base model")
    demo.add_argument("--finetune-epochs", type=int, default=None)
    demo.add_argument("--methods", default=None,
                      help="comma-separated subset of l1,bn,reprune,csgd")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true",
                      help="tiny settings (a smoke test, ~1 min)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    prune = commands.add_parser("prune", help="prune a model one-shot and save it")
    prune.add_argument("--model", required=True,
                       help="torchvision:NAME, accelprune:NAME (resnet20, resnet56, vgg_small) "
                            "or a .pt file saved with accelprune.save")
    prune.add_argument("--method", required=True, choices=METHODS)
    prune.add_argument("--sparsity", type=_fraction, default=0.5,
                       help="fraction of channels to remove")
    prune.add_argument("--out", required=True, help="where to save the pruned model (.pt)")
    prune.add_argument("--input-shape", type=_input_shape, default=None,
                       help="example input shape, e.g. 1,3,224,224 (default from the model)")
    prune.add_argument("--num-classes", type=int, default=None,
                       help="classifier width of built-in models")
    prune.add_argument("--ignore", action="append", default=[], metavar="LAYER",
                       help="a module name whose outputs are left alone (repeatable)")
    prune.add_argument("--seed", type=int, default=0)

    bench = commands.add_parser("bench", help="run benchmarks and print their ratio tables")
    bench.add_argument("which", nargs="?", default="all", choices=(*BENCHMARKS, "all"))
    bench.add_argument("--quick", action="store_true", help="small shapes, a smoke check")
    bench.add_argument("--show", action="store_true",
                       help="print the saved results (benchmarks/results) instead of running")
    return parser


# ---------------------------------------------------------------------------------------------
# demo


def run_demo_command(args) -> None:
    from accelprune.demo import METHODS, DemoConfig, results_table, run_demo

    overrides = {"out_dir": args.out, "budget": args.budget, "seed": args.seed,
                 "progress": not args.no_progress}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.finetune_epochs is not None:
        overrides["finetune_epochs"] = args.finetune_epochs
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            raise UsageError(f"--methods: unknown {unknown or 'empty list'}; "
                             f"choose from {','.join(METHODS)}")
        overrides["methods"] = methods
    for key in ("epochs", "finetune_epochs"):
        if overrides.get(key, 1) < 0:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 0")
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    doc = run_demo(config)
    print(f"\nResNet-20 on scikit-learn digits, pruned to -{config.budget:.0%} MACs "
          f"({doc['seconds']:.0f} s in all)\n")
    print(results_table(doc))
    print(f"\nwrote {Path(config.out_dir) / 'demo.json'}, widths.png and accuracy_vs_macs.png")


# ---------------------------------------------------------------------------------------------
# prune


def load_model(spec: str, num_classes: int | None):
    """(model, default input shape) from ``torchvision:NAME``, ``accelprune:NAME`` or a file."""
    import torch

    import accelprune

    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise UsageError(f"torchvision has no classification model {name!r}")
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return torchvision.models.get_model(name, weights=None, **kwargs), (1, 3, 224, 224)
    if spec.startswith("accelprune:"):
        from accelprune import models

        name = spec.split(":", 1)[1]
        if name not in models.__all__:
            raise UsageError(f"accelprune.models has no model {name!r}; "
                             f"choose from {', '.join(models.__all__)}")
        return getattr(models, name)(num_classes=num_classes or 10), (1, 3, 32, 32)
    path = Path(spec)
    if not path.is_file():
        raise UsageError(
            f"--model: {spec!r} is neither torchvision:NAME, accelprune:NAME nor a file")
    try:
        model = accelprune.load(path)
    except Exception as error:  # an unreadable or foreign file: say so in one line
        raise UsageError(
            f"cannot load {spec!r} as a model saved with accelprune.save: {error}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec!r} holds a {type(model).__name__}, not a torch.nn.Module")
    return model, None


def _taylor_gradients(model, example_inputs) -> None:
    """Gradients for the Taylor criterion without data: the loss of the model's own predictions
    on the example inputs (use the Python API with real batches for a meaningful ranking)."""
    import torch.nn.functional as F

    model.zero_grad()
    outputs = model(example_inputs)
    F.cross_entropy(outputs, outputs.argmax(dim=1)).backward()


def run_prune_command(args) -> None:
    import torch

    import accelprune

    model, default_shape = load_model(args.model, args.num_classes)
    shape = args.input_shape or default_shape
    if shape is None:
        raise UsageError("--input-shape is needed for a model loaded from a file")
    torch.manual_seed(args.seed)
    example_inputs = torch.randn(*shape)
    model.eval()
    before = copy.deepcopy(model)
    ignored = args.ignore or None
    if args.method in ("taylor", "gradient"):
        _taylor_gradients(model, example_inputs)
    accelprune.prune_with(model, example_inputs, args.sparsity, args.method,
                          ignored_layers=ignored, seed=args.seed)
    model.zero_grad(set_to_none=True)
    print(accelprune.report(before, model, example_inputs))
    accelprune.save(model, args.out)
    print(f"saved {args.out} (load it with accelprune.load)")


# ---------------------------------------------------------------------------------------------
# bench


def run_bench_command(args) -> None:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "harness.py").is_file():
        raise UsageError("the benchmarks ship with the source tree; run `accelprune bench` from an "
                         "editable install (pip install -e .)")
    if args.show:
        subprocess.run([sys.executable, "-m", "benchmarks.summary"], cwd=root, check=False)
        return
    which = BENCHMARKS if args.which == "all" else (args.which,)
    failed = []
    for name in which:
        command = [sys.executable, "-m", f"benchmarks.bench_{name}",
                   *(["--quick"] if args.quick else [])]
        print(f"$ {' '.join(command[1:])}", flush=True)
        if subprocess.run(command, cwd=root).returncode != 0:
            failed.append(name)
    if failed:
        raise UsageError(f"benchmarks failed: {', '.join(failed)}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"demo": run_demo_command, "prune": run_prune_command, "bench": run_bench_command}
    try:
        handlers[args.command](args)
    except UsageError as error:
        parser.exit(2, f"accelprune {args.command}: error: {error}\n")
    except (ValueError, TypeError) as error:  # accelprune's own checks name the problem
        parser.exit(2, f"accelprune {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
