"""The ``accelprune`` command: ``demo``, ``prune`` and ``bench``.

Bad arguments give a one-line message and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = ("ward", "coverage", "kernels", "reprune", "csgd", "kmeans", "groups", "large",
              "quality")


class UsageError(Exception):
    """A problem with what the user asked for; reported without a traceback (exit status 2)."""


class RuntimeFailure(Exception):
    """The work failed for a reason outside the arguments (e.g. the disk filled up): one line,
    exit status 1."""


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


# Seeds go to torch, numpy and the engines (seed + layer index): one range that all accept.
SEED_MAX = 2**32 - 1


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32 - 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _n_of_m(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:M like 2:4, got {text!r}") from None
    if not 1 <= n < m <= 64:
        raise argparse.ArgumentTypeError(f"need 1 <= N < M <= 64, got {text!r}")
    return n, m


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from accelprune.methods import METHODS

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
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--quick", action="store_true",
                      help="tiny settings (a smoke test, ~1 min)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    prune = commands.add_parser("prune", help="prune a model one-shot and save it")
    prune.add_argument("--model", required=True,
                       help="torchvision:NAME, timm:NAME, accelprune:NAME (resnet20, resnet56, "
                            "vgg_small) or a .pt file saved with accelprune.save (weights-only; "
                            "it must name its constructor, as the files this command writes do)")
    prune.add_argument("--method", required=True, choices=METHODS)
    amount = prune.add_mutually_exclusive_group()
    amount.add_argument("--sparsity", type=_fraction, default=None,
                        help="fraction of channels to remove (default 0.5)")
    amount.add_argument("--macs", type=_fraction, default=None, metavar="FRACTION",
                        help="prune until this fraction of the MACs is removed "
                             "(accelprune.prune_to_macs) instead of giving --sparsity")
    prune.add_argument("--out", required=True, help="where to save the pruned model (.pt)")
    prune.add_argument("--input-shape", type=_input_shape, default=None,
                       help="example input shape, e.g. 1,3,224,224 (default from the model)")
    prune.add_argument("--num-classes", type=_positive_int, default=None,
                       help="classifier width of built-in models")
    prune.add_argument("--ignore", action="append", default=[], metavar="LAYER",
                       help="a module name whose outputs are left alone (repeatable)")
    prune.add_argument("--nm", type=_n_of_m, default=None, metavar="N:M",
                       help="after the channels, keep N of every M weights along each layer's "
                            "input (e.g. 2:4, semi-structured sparsity; masks made permanent)")
    prune.add_argument("--seed", type=_seed, default=0)
    prune.add_argument("--allow-pickle", action="store_true",
                       help="UNSAFE: also read a --model file holding pickled Python objects "
                            "(accelprune 0.1 files); unpickling runs code named by the file")

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

    check_output_dir(args.out)
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


DEFAULT_SHAPES = {"torchvision": (1, 3, 224, 224), "timm": (1, 3, 224, 224),
                  "accelprune": (1, 3, 32, 32)}


def check_output_file(path_text: str) -> Path:
    """``--out``: a file that can be written, checked before any work (by creating it, or for an
    existing file opening it for appending, which changes nothing)."""
    if not path_text.strip():
        raise UsageError("--out is empty; give a file path such as pruned.pt")
    path = Path(path_text)
    if path.is_dir():
        raise UsageError(f"--out {path_text!r} is a directory; give a file path inside it")
    parent = path.parent
    if not parent.exists():
        raise UsageError(f"--out {path_text!r}: the directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise UsageError(f"--out {path_text!r}: {str(parent)!r} is not a directory")
    existed = path.exists()
    try:
        with open(path, "ab" if existed else "xb"):
            pass
    except OSError as error:
        raise UsageError(f"--out {path_text!r} cannot be written: "
                         f"{error.strerror or error}") from None
    if not existed:
        path.unlink()
    return path


def check_output_dir(path_text: str) -> Path:
    """``demo --out``: a folder that exists or can be created under a writable parent."""
    if not path_text.strip():
        raise UsageError("--out is empty; give a folder such as demo_out")
    path = Path(path_text)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path_text!r} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path_text!r} cannot be created or written in {str(existing)!r}")
    return path


# The forward pass holds several activations the size of the input or larger: refuse inputs
# above this share of the available memory rather than let the allocator fail (or the OS kill us).
INPUT_MEMORY_SHARE = 1 / 8


def check_input_size(shape: tuple[int, ...]) -> None:
    """Refuse an example input (float32) that cannot reasonably fit in memory."""
    needed = math.prod(shape) * 4
    from accelprune.constructors import available_memory

    available = available_memory()
    limit = (available if available is not None else 2**40) * INPUT_MEMORY_SHARE
    if needed > limit:
        text = ",".join(map(str, shape))
        have = "" if available is None else f"; {available / 1e9:.1f} GB of memory is available"
        raise UsageError(f"--input-shape {text} needs {needed / 1e9:.1f} GB for the input tensor "
                         f"alone, and a forward pass several times that{have}")


def _source_of(spec: str) -> str | None:
    source, sep, _ = spec.partition(":")
    return source if sep and source in DEFAULT_SHAPES else None


def load_model(spec: str, num_classes: int | None, allow_pickle: bool = False):
    """(model, default input shape, constructor for saving) from ``torchvision:NAME``,
    ``timm:NAME``, ``accelprune:NAME`` or a file written by :func:`accelprune.save` (weights
    only: nothing in the file is executed)."""
    import accelprune
    from accelprune import constructors, serialization

    source = _source_of(spec)
    if source is not None:
        name = spec.split(":", 1)[1]
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        if source == "accelprune":
            from accelprune import models

            if name not in models.__all__ or name == "BasicBlock":
                raise UsageError(f"accelprune.models has no model {name!r}; "
                                 f"choose from resnet20, resnet56, vgg_small")
        elif source == "torchvision":
            import torchvision

            if name not in torchvision.models.list_models(module=torchvision.models):
                raise UsageError(f"torchvision has no classification model {name!r}")
        constructor = {"name": spec, "kwargs": kwargs}
        try:
            model = constructors.build(constructor, where=f"--model {spec}")
        except ValueError as error:
            raise UsageError(str(error)) from None
        return model, DEFAULT_SHAPES[source], constructor
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--model: {spec!r} is neither torchvision:NAME, timm:NAME, "
                         "accelprune:NAME nor a file")
    try:
        model = accelprune.load(path, allow_pickle=allow_pickle)
        try:
            constructor = serialization.constructor_of(path)
        except ValueError:  # an accelprune 0.1 pickle (allowed above) names no constructor
            constructor = None
    except (ValueError, TypeError, OSError) as error:
        message = str(error).replace("allow_pickle=True", "--allow-pickle")
        raise UsageError(f"cannot load {spec!r}: {message}") from None
    source = _source_of(constructor["name"]) if constructor else None
    return model, DEFAULT_SHAPES.get(source), constructor


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

    # every argument is checked before any work
    out = check_output_file(args.out)
    if args.input_shape is not None:
        check_input_size(args.input_shape)
    sparsity = 0.5 if args.sparsity is None and args.macs is None else args.sparsity

    model, default_shape, constructor = load_model(args.model, args.num_classes,
                                                   args.allow_pickle)
    shape = args.input_shape or default_shape
    if shape is None:
        raise UsageError("--input-shape is needed: the model file names no constructor to "
                         "take a default input shape from")
    torch.manual_seed(args.seed)
    example_inputs = torch.randn(*shape)
    model.eval()
    before = copy.deepcopy(model)
    ignored = args.ignore or None
    if args.method in ("taylor", "gradient"):
        _taylor_gradients(model, example_inputs)
    if args.macs is not None:
        sparsity = accelprune.prune_to_macs(model, example_inputs, args.method, args.macs,
                                            ignored_layers=ignored, seed=args.seed)
        print(f"sparsity {sparsity:.3f} removes {args.macs:.0%} of the MACs")
    else:
        accelprune.prune_with(model, example_inputs, sparsity, args.method,
                              ignored_layers=ignored, seed=args.seed)
    model.zero_grad(set_to_none=True)
    if args.nm is not None:
        nm = accelprune.nm_prune(model, *args.nm)
        accelprune.make_permanent(model)
        print(f"{args.nm[0]}:{args.nm[1]} sparsity on {len(nm.pruned)} weights "
              f"({len(nm.skipped)} skipped: input width not a multiple of {args.nm[1]})")
    print(accelprune.report(before, model, example_inputs))
    kwargs = {} if constructor is None else {"constructor": constructor["name"],
                                             "constructor_kwargs": constructor["kwargs"]}
    try:
        accelprune.save(model, out, **kwargs)
    except OSError as error:
        raise RuntimeFailure(f"cannot write {args.out!r}: {error.strerror or error}") from None
    print(f"saved {out} (load it with accelprune.load({str(out)!r}))")


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
    except RuntimeFailure as error:
        parser.exit(1, f"accelprune {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
