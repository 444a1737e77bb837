"""The `longctx` command line."""

from __future__ import annotations

import argparse
import os
import sys

from longctx.config import ConfigError, load_config, to_yaml
from longctx.errors import RunError

EPILOG_TRAIN = """\
examples:
  longctx train                                   # the built-in tiny CPU preset (cp=2 ring, 2 Ray workers)
  longctx train configs/llama-1b-32k.yaml --dry-run
  longctx train configs/tiny.yaml train.steps=100 parallel.cp=1
  longctx train run.name=myrun checkpoint.resume=auto   # continue a run from its last checkpoint
  ray job submit --working-dir . -- longctx train configs/llama-8b-128k.yaml

Any config key can be overridden as section.key=value; `longctx config show`
prints every key with its resolved value.
"""

EPILOG_EVAL = """\
examples:
  longctx eval runs/exp1                                  # held-out loss/accuracy of the latest checkpoint
  longctx eval runs/exp1 --task niah                      # needle in a haystack, up to 2 x seq_len
  longctx eval runs/exp1 --task niah --lengths 512,1024,2048 --depths 0,0.5,1 --samples 4 launcher=local
  longctx eval runs/exp1 --task ppl --length 8192 parallel.cp=4 ray.num_workers=4
  longctx eval /models/llama-3.2-1b --task niah --json niah.json --plot niah.png

niah and ppl run like training (Ray workers with context parallelism; launcher=local: one
process) and log their metrics, JSON and plot into the run's MLflow run.
"""


def _split_config_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    """The first positional is the YAML file unless it looks like key=value."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, list(args)


def _load(args: list[str]):
    path, overrides = _split_config_and_overrides(args)
    return load_config(path, overrides)


def cmd_train(ns: argparse.Namespace) -> int:
    cfg = _load(ns.args)
    if ns.dry_run:
        return dry_run(cfg)
    from longctx.launch.driver import train
    return train(cfg, argv=ns.args, verbose=ns.verbose)


def dry_run(cfg) -> int:
    """Resolve, build on meta, print the plan; no processes, no files."""
    from longctx.launch.resolve import resolve_config
    from longctx.models.estimate import plan_text
    from longctx.trainer.tokenizer import build_tokenizer

    cfg, notes = resolve_config(cfg)
    vocab = cfg.model.vocab_size or build_tokenizer(cfg.data.tokenizer).vocab_size
    print(plan_text(cfg, vocab))
    for note in notes:
        if note.startswith("parallel.strategy=auto"):
            print(note)
    return 0


def cmd_config_show(ns: argparse.Namespace) -> int:
    print(to_yaml(_load(ns.args)), end="")
    return 0


# `longctx eval` flags that set a long-context task's options: flag -> (task, option field)
EVAL_OPTIONS = {"lengths": ("niah", "lengths"), "depths": ("niah", "depths"), "samples": ("niah", "samples"),
                "haystack": ("niah", "haystack"), "length": ("ppl", "length"), "buckets": ("ppl", "buckets"),
                "docs": ("ppl", "docs"), "batch_size": (None, "batch_size")}


def _print_metrics(metrics: dict) -> None:
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.4f}")


def cmd_eval(ns: argparse.Namespace) -> int:
    given = {}
    for flag, (task, option) in EVAL_OPTIONS.items():
        value = getattr(ns, flag)
        if value is not None:
            if ns.task == "loss" or task not in (None, ns.task):
                raise ConfigError(f"--{flag.replace('_', '-')} applies to --task {task or 'niah or ppl'}, "
                                  f"not --task {ns.task}")
            given[option] = value
    if ns.task == "loss":
        from longctx.trainer.evaluate import evaluate_checkpoint

        if ns.plot:
            raise ConfigError("--plot applies to --task niah or ppl (the loss task has no plot)")
        metrics = evaluate_checkpoint(ns.target, ns.args)
        _print_metrics(metrics)
        if ns.json:
            import json

            with open(ns.json, "w") as f:
                json.dump(metrics, f, indent=2)
            print(f"wrote {ns.json}")
        return 0
    from longctx.trainer.evaluate import run_long_eval
    from longctx.trainer.long_eval import summary_metrics
    from longctx.trainer.metrics import setup_logging

    setup_logging()
    results, files = run_long_eval(ns.target, ns.task, ns.args, given, ns.json, ns.plot)
    _print_metrics(summary_metrics(results))
    for path in files:
        print(f"wrote {path}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts (e.g. 256,1024), got {text!r}")
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"expected lengths of at least 2 tokens, got {text!r}")
    return values


def _fraction_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions in [0, 1] (e.g. 0,0.5,1), got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def cmd_export(ns: argparse.Namespace) -> int:
    from longctx.launch.export import export

    print(f"wrote {export(ns.target, ns.out_dir, ns.dtype)}")
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from longctx import bench

    module = bench.load(ns.benchmark)
    result = module.run(ns)
    print(bench.render(result), end="")
    if ns.json:
        bench.write_json(result, ns.json)
        print(f"wrote {ns.json}")
    if ns.plot:
        module.plot(result, ns.plot)
        print(f"wrote {ns.plot}")
    return 0


def _add_bench_parsers(sub) -> None:
    from longctx import bench

    b = sub.add_parser("bench", help="benchmarks: tables, JSON and PNG plots",
                       description="Run a benchmark and print its table; --json and --plot save the "
                                   "results. Each runs on CPU (gloo, reference kernels) and unchanged on GPUs.")
    bsub = b.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in bench.BENCHMARKS:
        module = bench.load(name)
        p = bsub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
        p.add_argument("--json", metavar="FILE", help="write the results as JSON")
        p.add_argument("--plot", metavar="FILE.png", help="write a plot of the results")
        module.add_arguments(p)
        p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longctx",
        description="Train long-context language models with context parallelism on Ray + DeepSpeed, "
                    "configured by YAML, logged to MLflow.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (Ray workers; or launcher=local for one process)",
                       description="Train with CONFIG.yaml (default: the built-in tiny CPU preset) and "
                                   "key=value overrides. Without a Ray address an embedded local Ray is "
                                   "started; under `ray job submit` the job's cluster is used.",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    t.add_argument("--dry-run", action="store_true",
                   help="resolve the config, build the model on the meta device and print parameters, "
                        "FLOPs per token, memory per GPU and the parallel plan; train nothing")
    t.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's, DeepSpeed's and MLflow's own messages on the console (by default they go "
                        "to <run>/logs/framework.log)")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="inspect configurations")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print the resolved YAML (defaults <- file <- overrides)")
    show.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    show.set_defaults(func=cmd_config_show)

    e = sub.add_parser("eval", help="evaluate a checkpoint: held-out loss, needle in a haystack, ppl by position",
                       description="Evaluate a run folder (its latest checkpoint), a checkpoint folder or a "
                                   "Hugging Face folder; key=value overrides apply to the run's config (e.g. "
                                   "train.eval_batches=16, launcher=local, parallel.cp=4 ray.num_workers=4).",
                       epilog=EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("target", metavar="RUN_OR_CHECKPOINT_OR_HF_DIR")
    e.add_argument("args", nargs="*", metavar="key=value")
    e.add_argument("--task", choices=("loss", "niah", "ppl"), default="loss",
                   help="loss: held-out loss and accuracy, one process (default); niah: needle in a haystack "
                        "over context lengths x depths; ppl: perplexity by position in long documents")
    e.add_argument("--json", metavar="FILE", help="write the results as JSON (niah/ppl default: "
                                                  "<run>/eval_<task>.json)")
    e.add_argument("--plot", metavar="FILE.png", help="niah: accuracy heatmap; ppl: perplexity by position "
                                                      "(default: <run>/eval_<task>.png)")
    g = e.add_argument_group("niah")
    g.add_argument("--lengths", type=_int_list, metavar="N,N,...",
                   help="context lengths in tokens (default: seq_len x 1/4, 1/2, 1, 2)")
    g.add_argument("--depths", type=_fraction_list, metavar="F,F,...",
                   help="needle depths as fractions of the haystack (default: 0,0.1,...,1)")
    g.add_argument("--samples", type=_positive, metavar="N", help="prompts per cell (default 2)")
    g.add_argument("--haystack", choices=("filler", "data"),
                   help="filler: the passkey task's filler (default for synthetic data); data: held-out "
                        "documents of the run's data (default otherwise)")
    g = e.add_argument_group("ppl")
    g.add_argument("--length", type=_positive, metavar="N", help="document length in tokens (default 2 x seq_len)")
    g.add_argument("--buckets", type=_positive, metavar="N", help="equal-width position buckets (default 16)")
    g.add_argument("--docs", type=_positive, metavar="N", help="documents (default 4)")
    e.add_argument("--batch-size", type=_positive, metavar="N", help="niah / ppl: rows per forward")
    e.set_defaults(func=cmd_eval)
    x = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face folder",
                       description="Consolidate the engine's shards (ZeRO 0-3 or DDP) of a run folder (its latest "
                                   "checkpoint) or a checkpoint folder and write OUT_DIR: config.json with the "
                                   "RoPE settings used in training, sharded *.safetensors with an index, the "
                                   "tokenizer files and generation_config.json; transformers' "
                                   "AutoModelForCausalLM.from_pretrained(OUT_DIR) loads it.")
    x.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    x.add_argument("out_dir", metavar="OUT_DIR", help="a new (or empty) folder")
    x.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the written weights")
    x.set_defaults(func=cmd_export)
    _add_bench_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    # argparse will not let `--dry-run` interrupt the key=value list, so overrides
    # written after a flag come back as "unknown": take them if they look like overrides.
    ns, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(ns, "args") and all("=" in x and not x.startswith("-") for x in extra):
            ns.args += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return ns.func(ns)
    except ConfigError as err:
        print(f"longctx: error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"longctx: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("longctx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
