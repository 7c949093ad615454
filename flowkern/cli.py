"""The `flowkern` command: train, sample, evaluate and score normalizing flows of 8-bit images.

    flowkern train  --data mnist --root DIR [--download] --out RUN [--steps N | --epochs N] ...
    flowkern sample --checkpoint RUN/checkpoint.pt --n 64 --temperature 0.7 --out grid.png
    flowkern eval   --checkpoint RUN/checkpoint.pt [--data SPEC]
    flowkern ood    --checkpoint RUN/checkpoint.pt --out-data SPEC [--in-data SPEC]
    torchrun --nproc_per_node N -m flowkern train ...      (DistributedDataParallel)

main(argv) parses and runs one subcommand and returns the exit code (the console script and
`python -m flowkern` pass it to sys.exit). The work itself is in flowkern.train.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

DATA_HELP = """\
data specs (--data, --in-data, --out-data):
  mnist            MNIST in ROOT/MNIST/raw/ (torchvision's layout; ROOT itself is searched too):
                   train-images-idx3-ubyte and t10k-images-idx3-ubyte, plain or .gz.
                   Trains on the 60,000, tests on the 10,000. --download fetches them.
  idx:IMAGES       one IDX image file (plain or .gz); the last --holdout images (default 10%)
                   are the held-out test split. E.g. the MNIST test set alone:
                   --data idx:DIR/t10k-images-idx3-ubyte.gz --holdout 1000
  idx:TRAIN,TEST   an IDX image file pair
  idx:DIR          a folder with train-images-idx3-ubyte and t10k-images-idx3-ubyte (plain or
                   .gz), as MNIST, Fashion-MNIST and KMNIST ship
  synthetic[:N]    N (default 10,000) MNIST-shaped synthetic digits, for smoke runs
  noise[:N]        N (default 10,000) uniform-noise images (an OOD set); also synthetic-noise
  inverted:SPEC    SPEC with pixels p -> 255 - p (an OOD set), e.g. inverted:mnist
"""

EXIT_HELP = """\
exit codes: 0 done; 2 bad options, missing data or an unusable checkpoint; 130 interrupted.
"""
TRAIN_EXIT_HELP = """\
exit codes: 0 done; 1 training stopped on a non-finite loss (the last good checkpoint is kept);
2 bad options, missing data or an unusable checkpoint; 130 interrupted.
"""

TRAIN_EPILOG = f"""\
{DATA_HELP}
Multi-process: torchrun --nproc_per_node N -m flowkern train ... trains with
DistributedDataParallel (nccl on GPUs, gloo on CPUs); --batch-size is the global batch.

The run folder holds config.json, checkpoint.pt (the last good state; --resume continues it
exactly), metrics.jsonl and metrics.csv, samples_t1.0.png, samples_t0.7.png, samples_t0.5.png,
samples/epoch_NNN_t*.png and summary.json.

{TRAIN_EXIT_HELP}"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilogs' layout; shows an option's default when it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
                and action.option_strings and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def _pos_float(text: str) -> float:
    v = _nonneg_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def _memory_saving(text: str):
    """--memory-saving K: 0 is off (False), K >= 1 keeps every K-th layer's input."""
    k = _int(0)(text)
    return False if k == 0 else k


def _int(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}")
        return v

    parse.__name__ = f"int>={minimum}"
    return parse


def _system_args(p: argparse.ArgumentParser) -> None:
    from .train import TRAIN_DEFAULTS
    import flowkern

    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (auto: CUDA when visible)")
    p.add_argument("--backend", choices=flowkern.BACKENDS, default=TRAIN_DEFAULTS["backend"],
                   help="flowkern's kernel implementation (see flowkern.available_backends())")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .train import COUPLINGS, DEQUANTIZE, MODEL_KINDS, NORMS, SCALES, SCHEDULES, TRAIN_DEFAULTS as D

    parser = argparse.ArgumentParser(
        prog="flowkern", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description="Train normalizing flows of 8-bit images (MNIST) by maximum likelihood on dequantized "
                    "pixels, report bits/dim, draw samples, and score out-of-distribution inputs.",
        epilog="Run `flowkern COMMAND --help` for a command's options.\n\n" + TRAIN_EXIT_HELP)
    parser.add_argument("--version", action="version", version=f"flowkern {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ------------------------------------------------------------------------------ train
    t = sub.add_parser("train", help="train a flow and write a run folder", formatter_class=_Formatter,
                       allow_abbrev=False, epilog=TRAIN_EPILOG,
                       description="Train a flow by maximum likelihood (bits/dim) on 8-bit images.")
    g = t.add_argument_group("data")
    g.add_argument("--data", default=D["data"], metavar="SPEC", help="the data set (specs below)")
    g.add_argument("--root", default=D["root"], metavar="DIR",
                   help="folder of --data mnist (ROOT/MNIST/raw/), and of relative idx: paths")
    g.add_argument("--download", action="store_true", help="fetch MNIST into ROOT with torchvision if missing")
    g.add_argument("--holdout", default=D["holdout"], metavar="N|FRAC",
                   help="held-out test images of single-file specs (idx:IMAGES, synthetic): a count or a "
                        "fraction (default 0.1)")
    g = t.add_argument_group("model")
    g.add_argument("--model", choices=MODEL_KINDS, default=D["model"],
                   help="realnvp: MLP couplings on flattened images; glow: multi-scale conv flow")
    g.add_argument("--coupling", choices=COUPLINGS, default=D["coupling"], help="realnvp's coupling")
    g.add_argument("--layers", metavar="N", type=_int(1), default=D["layers"],
                   help="realnvp: couplings; glow: steps per level")
    g.add_argument("--hidden", metavar="N", type=_int(1), default=D["hidden"], help="width of the conditioner networks")
    g.add_argument("--norm", choices=NORMS, default=D["norm"], help="realnvp's layer before each coupling")
    g.add_argument("--levels", metavar="N", type=_int(1), default=D["levels"], help="glow's levels (28x28 takes <= 2)")
    g.add_argument("--scale", choices=SCALES, default=D["scale"], help="affine couplings' scale function")
    g.add_argument("--alpha", metavar="A", type=_nonneg_float, default=D["alpha"],
                   help="logit squeeze of the dequantized pixels")
    g.add_argument("--bins", metavar="N", type=_int(1), default=D["bins"], help="spline bins")
    g.add_argument("--bound", metavar="B", type=_pos_float, default=D["bound"], help="spline tail bound")
    g.add_argument("--dequantize", choices=DEQUANTIZE, default=D["dequantize"],
                   help="noise added to the 8-bit pixels: uniform (Theis et al.), variational (a learned q(u|x), "
                        "Flow++), or none (raw pixels: shows why the data must be dequantized)")
    g = t.add_argument_group("training")
    g.add_argument("--out", metavar="DIR", help="the run folder (required)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", metavar="N", type=_int(1), help="optimizer steps in all")
    length.add_argument("--epochs", metavar="N", type=_int(1),
                        help="epochs in all (default 10 when --steps is not given)")
    g.add_argument("--batch-size", metavar="N", type=_int(1), default=D["batch_size"],
                   help="global batch (split over torchrun's processes)")
    g.add_argument("--lr", metavar="LR", type=_pos_float, default=D["lr"], help="peak learning rate of AdamW")
    g.add_argument("--warmup", metavar="STEPS", type=_int(0), default=D["warmup"], help="linear warmup steps")
    g.add_argument("--schedule", choices=SCHEDULES, default=D["schedule"],
                   help="after warmup: cosine to 0, or constant")
    g.add_argument("--weight-decay", metavar="WD", type=_nonneg_float, default=D["weight_decay"],
                   help="AdamW's decoupled weight decay")
    g.add_argument("--clip", metavar="NORM", type=_nonneg_float, default=D["clip"],
                   help="clip the gradient norm (of the bits/dim loss; typical norms are ~0.1) at this value; 0: off")
    g.add_argument("--seed", metavar="N", type=_int(0), default=D["seed"], help="seeds the model, data order and noise")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue a run exactly: OUT/checkpoint.pt, or the checkpoint given. Options not given "
                        "again are the run's; --steps/--epochs/--lr/... may change, the model may not")
    g.add_argument("--overwrite", action="store_true", help="start again in a run folder that holds a checkpoint")
    g.add_argument("--stop-at", type=_int(1), metavar="STEP",
                   help="stop (with a checkpoint) after this step, as if interrupted; the schedule still "
                        "runs to --steps/--epochs")
    g.add_argument("--time-limit", type=_pos_float, metavar="MINUTES",
                   help="stop after the step that passes this much training time (this invocation; the "
                        "learning-rate schedule still spans --steps/--epochs)")
    g = t.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", metavar="STEPS", type=_int(0), default=D["eval_every"],
                   help="held-out bits/dim every N steps, besides every epoch (0: epochs only)")
    g.add_argument("--eval-limit", metavar="N", type=_int(1), default=D["eval_limit"],
                   help="evaluate on the first N test images")
    g.add_argument("--eval-batch-size", metavar="N", type=_int(1), default=D["eval_batch_size"],
                   help="evaluation batch")
    g.add_argument("--checkpoint-every", metavar="STEPS", type=_int(0), default=D["checkpoint_every"],
                   help="a checkpoint every N steps, besides every epoch (0: epochs only)")
    g.add_argument("--log-every", metavar="STEPS", type=_int(0), default=D["log_every"],
                   help="a metrics row every N steps (0: epochs only)")
    g.add_argument("--n-samples", metavar="N", type=_int(0), default=D["n_samples"],
                   help="images per sample grid (temperatures 1.0, 0.7, 0.5; 0: none)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines, only the final summary")
    g = t.add_argument_group("system")
    _system_args(g)
    g.add_argument("--threads", metavar="N", type=_int(1), help="CPU threads (torch.set_num_threads)")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms (GPU runs)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=D["compile"],
                   help="torch.compile the training step: the first step takes the compile time, the later ones "
                        "run 5-14%% faster on a CPU; the dequantization noise then comes from torch.rand, another "
                        "random stream than an eager run's")
    g.add_argument("--memory-saving", nargs="?", const=True, default=D["memory_saving"], type=_memory_saving,
                   metavar="K", help="backprop through the layers' exact inverses: activation memory independent of "
                                     "depth, for about one more pass per step; K also keeps every K-th layer's input "
                                     "(0: off, e.g. when resuming a run that had it)")
    t.set_defaults(func=_cmd_train)

    # ----------------------------------------------------------------------------- sample
    s = sub.add_parser("sample", help="draw a sample grid from a checkpoint", formatter_class=_Formatter,
                       allow_abbrev=False, description="Draw samples from a trained flow into a PNG grid.",
                       epilog=EXIT_HELP)
    s.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint.pt (or its run folder)")
    s.add_argument("--n", metavar="N", type=_int(1), default=64, help="number of samples")
    s.add_argument("--temperature", type=_nonneg_float, nargs="+", default=[0.7], metavar="T",
                   help="scale of the base samples; several values write one grid each (OUT_tT.png)")
    s.add_argument("--out", default="samples.png", metavar="PNG", help="the grid image")
    s.add_argument("--nrow", metavar="N", type=_int(1), help="images per row (default: a square grid)")
    s.add_argument("--seed", metavar="N", type=_int(0), default=0, help="seeds the latents")
    _system_args(s)
    s.set_defaults(func=_cmd_sample)

    # ------------------------------------------------------------------------------- eval
    e = sub.add_parser("eval", help="bits/dim of a checkpoint on held-out data", formatter_class=_Formatter,
                       allow_abbrev=False, description="Mean bits/dim of a trained flow on a data split.",
                       epilog=DATA_HELP + "\n" + EXIT_HELP)
    e.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint.pt (or its run folder)")
    e.add_argument("--data", metavar="SPEC", help="the data (default: what the model trained on)")
    _data_args(e)
    e.add_argument("--split", choices=("test", "train"), default="test", help="which split to score")
    e.add_argument("--samples", metavar="K", type=_int(1), default=1,
                   help="also estimate log P(x) with K dequantization draws per image (importance-weighted)")
    e.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    _system_args(e)
    e.set_defaults(func=_cmd_eval)

    # -------------------------------------------------------------------------------- ood
    o = sub.add_parser("ood", help="out-of-distribution scores, AUROC and a histogram", formatter_class=_Formatter,
                       allow_abbrev=False, epilog=DATA_HELP + "\n" + EXIT_HELP,
                       description="Score an in-distribution and an out-of-distribution set by bits/dim "
                                   "(higher = more anomalous): per-sample bits/dim of both (.npy, .csv), the "
                                   "AUROC, and a histogram PNG. A flow can give another data set HIGHER "
                                   "likelihood than its own (Nalisnick et al., 2018): AUROC < 0.5 shows it.")
    o.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint.pt (or its run folder)")
    o.add_argument("--in-data", metavar="SPEC", help="in-distribution data (default: what the model trained on)")
    o.add_argument("--out-data", required=True, metavar="SPEC",
                   help="out-of-distribution data, e.g. noise, inverted:synthetic, "
                        "idx:fashion/t10k-images-idx3-ubyte.gz")
    _data_args(o)
    o.add_argument("--split", choices=("test", "train"), default="test", help="which split of both sets to score")
    o.add_argument("--out", metavar="DIR", help="output folder (default: CHECKPOINT_DIR/ood)")
    _system_args(o)
    o.set_defaults(func=_cmd_ood)
    return parser


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", metavar="DIR", help="folder of mnist / relative idx: paths (default: the run's)")
    p.add_argument("--holdout", metavar="N|FRAC", help="test split of single-file specs (default: the run's, or 0.1)")
    p.add_argument("--download", action="store_true", help="fetch MNIST with torchvision if missing")
    p.add_argument("--limit", metavar="N", type=_int(1), help="score only the first N images of each set")
    p.add_argument("--batch-size", metavar="N", type=_int(1), default=1000, help="images per forward pass")
    p.add_argument("--seed", metavar="N", type=_int(0), default=0, help="seeds the dequantization noise")


# ---------------------------------------------------------------------------------- commands

# Options that belong to one invocation, never inherited from a resumed run's config.
_PER_INVOCATION = ("resume", "overwrite", "stop_at", "time_limit", "quiet", "download")


def _explicit(parser: argparse.ArgumentParser, command: str, argv: Sequence[str]) -> set:
    """The dests of the options written on the command line (allow_abbrev=False, so exact)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    given = set()
    for action in sub._actions:
        for opt in action.option_strings:
            if any(tok == opt or tok.startswith(opt + "=") for tok in argv):
                given.add(action.dest)
    return given


def _train_config(args: argparse.Namespace, explicit: set) -> dict:
    from .train import CHECKPOINT_NAME, TRAIN_DEFAULTS, UsageError, load_checkpoint

    given = {k: v for k, v in vars(args).items() if k in TRAIN_DEFAULTS}
    if args.resume is None:
        if not args.out:
            raise UsageError("--out DIR (the run folder) is required")
        return given
    if args.resume == "auto":
        if not args.out:
            raise UsageError("--resume needs --out RUN (or --resume RUN/checkpoint.pt)")
        path = os.path.join(args.out, CHECKPOINT_NAME)
        if not os.path.isfile(path):
            raise UsageError(f"nothing to resume: no {CHECKPOINT_NAME} in {os.path.abspath(args.out)}")
    else:
        path = args.resume
    ckpt = load_checkpoint(path)
    cfg = {k: v for k, v in ckpt["config"].items() if k in TRAIN_DEFAULTS}
    cfg.update({k: given[k] for k in explicit if k in given})
    if "steps" in explicit:
        cfg["epochs"] = None
    if "epochs" in explicit:
        cfg["steps"] = None
    for key in _PER_INVOCATION:
        cfg[key] = given[key]
    cfg["resume"] = ckpt["path"]
    cfg["out"] = args.out or os.path.dirname(ckpt["path"])
    return cfg


def _cmd_train(args, parser, argv) -> int:
    from .train import train

    cfg = _train_config(args, _explicit(parser, "train", argv))
    train(cfg)
    return 0


def _cmd_sample(args, parser, argv) -> int:
    from .train import sample

    paths = sample(args.checkpoint, args.out, n=args.n, temperatures=args.temperature, nrow=args.nrow,
                   seed=args.seed, device=args.device, backend=args.backend)
    for p in paths:
        print(f"wrote {p}")
    return 0


def _cmd_eval(args, parser, argv) -> int:
    from .train import check_output_file, evaluate, write_json

    if args.json:
        check_output_file(args.json, "--json")
    r = evaluate(args.checkpoint, data=args.data, root=args.root, holdout=args.holdout, split=args.split,
                 limit=args.limit, batch_size=args.batch_size, seed=args.seed, device=args.device,
                 backend=args.backend, download=args.download, samples=args.samples)
    err = f" +- {r['bpd_std_error']:.4f}" if r["bpd_std_error"] is not None else ""
    print(f"{r['split']} bits/dim: {r['bpd']:.4f}{err} (standard error) on {r['images']} images of {r['description']}")
    if "bpd_iw" in r:
        err = f" +- {r['bpd_iw_std_error']:.4f}" if r["bpd_iw_std_error"] is not None else ""
        print(f"{r['split']} bits/dim, {r['samples']}-sample importance-weighted estimate: {r['bpd_iw']:.4f}{err}")
    if r["non_finite"]:
        print(f"warning: {r['non_finite']} images had non-finite bits/dim (left out of the mean)")
    if args.json:
        write_json(args.json, r)
    return 0


def _cmd_ood(args, parser, argv) -> int:
    from .train import ood

    r = ood(args.checkpoint, args.out_data, in_data=args.in_data, root=args.root, holdout=args.holdout,
            split=args.split, limit=args.limit, out_dir=args.out, batch_size=args.batch_size, seed=args.seed,
            device=args.device, backend=args.backend, download=args.download)
    for name in ("in", "out"):
        s = r[name]
        mean = "-" if s["mean"] is None else f"{s['mean']:.4f}"
        median = "-" if s["median"] is None else f"{s['median']:.4f}"
        print(f"{name:>3}: {r[name + '_data']} ({r['split']} split): {s['n']} images, bits/dim mean {mean}, "
              f"median {median}" + (f", {s['non_finite']} non-finite" if s["non_finite"] else ""))
    print(f"AUROC of bits/dim as the OOD score: {r['auroc']:.4f}")
    if r["out_more_likely"]:
        print("  < 0.5: the flow gives the OUT set higher likelihood (lower bits/dim) than its own data, the "
              "effect of Nalisnick et al. (2018); bits/dim alone would not flag it")
    print(f"wrote {r['out_dir']}: bpd_in.npy, bpd_out.npy, ood_scores.csv, ood_histogram.png, ood.json")
    return 0


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command in argv (default sys.argv[1:]); return the exit code."""
    argv: List[str] = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse has printed them
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)

    from . import BackendUnavailable
    from .data import DataError, MissingDataset
    from .train import CheckpointError, TrainingDiverged, UsageError

    def report(message: str) -> None:
        if _rank() == 0:  # the other processes of a torchrun job hit the same error
            print(f"flowkern {args.command}: error: {message}", file=sys.stderr)

    try:
        return args.func(args, parser, argv)
    except (MissingDataset, DataError, UsageError, CheckpointError, BackendUnavailable) as e:
        report(str(e))
        return 2
    except TrainingDiverged as e:
        report(str(e))
        return 1
    except (FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        report(f"{e.strerror or e}: {e.filename}")  # an output (or input) path the system refuses
        return 2
    except KeyboardInterrupt:
        report("interrupted; the run folder keeps its last checkpoint (continue with --resume)")
        return 130


def exit_with(code: int) -> None:
    """sys.exit(code), except in a torchrun worker: there the process ends with os._exit once its
    output is flushed. The process group is destroyed by then, but gloo's worker threads can still
    be unwinding when the interpreter runs C++ static destructors, which then aborts the process
    ("terminate called without an active exception") after a successful run."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def console_main() -> None:
    """The `flowkern` console script."""
    exit_with(main())


if __name__ == "__main__":
    console_main()
