"""The `mxfx` command line (also `python -m mxfx`).

    mxfx formats
    mxfx quantize MODEL --config CONFIG [--inputs SPEC] --out FILE.pt2
    mxfx checkpoint MODEL --config CONFIG --format compressed-tensors|quark|gguf --out DIR [--inputs SPEC] [--tokenizer DIR]
    mxfx inspect FILE.pt2 [--graph] [--svg OUT] [--format table|markdown|csv|json]
    mxfx sensitivity MODEL [--formats F1,F2 | --candidates W:A,...] --mode local|isolated|all-but-one|gradient
                     --out report.json [--md] [--plot PNG] [--noise N]  (torchrun --nproc-per-node N -m mxfx ... shards it)
    mxfx search MODEL --formats F1,F2 --budget-bits B --out config.toml [--noise N]
    mxfx search MODEL --candidates W:A,W:A --budgets B1,B2 [--act-budget-bits A] --plot front.png --out mixed.toml [--noise N]

MODEL is `package.module:factory`; the factory returns a model, or (model, example_inputs).
Exit codes: 0 success, 2 usage error, 1 failure (one line; --debug shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

from mxfx.errors import MXValueError


def _progress(message: str) -> float:
    print(f"mxfx: {message}...", file=sys.stderr, flush=True)
    return time.perf_counter()


def _done(start: float) -> None:
    print(f"mxfx:   done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def parse_inputs(spec: str) -> tuple:
    """'2x16:int64,2x16' -> (randint tensor (2, 16), randn tensor (2, 16)); int inputs are token ids < 100."""
    tensors = []
    for item in spec.split(","):
        shape_text, _, dtype_text = item.partition(":")
        shape = tuple(int(s) for s in shape_text.lower().split("x"))
        dtype = getattr(torch, dtype_text or "float32", None)
        if not isinstance(dtype, torch.dtype):
            raise MXValueError(f"unknown dtype {dtype_text!r} in --inputs {spec!r}")
        tensors.append(torch.randint(0, 100, shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape, dtype=dtype))
    return tuple(tensors)


def load_factory(target: str):
    module_name, _, attr = target.partition(":")
    if not attr:
        raise MXValueError(f"MODEL must be 'package.module:factory', got {target!r}")
    # The working directory by its absolute path, and fresh finder caches: a path finder for "." keeps
    # the listing of whichever directory was current when it was built, and a module written a moment
    # ago may not be in it.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    factory = getattr(importlib.import_module(module_name), attr)
    result = factory()
    return result if isinstance(result, tuple) else (result, None)


def _cmd_formats(args) -> None:
    import mxfx

    print(mxfx.format_table())


def _cmd_quantize(args) -> None:
    import mxfx

    start = _progress(f"building {args.model}")
    model, example = _example_inputs(args)
    _done(start)
    start = _progress("exporting and quantizing")
    prepared = mxfx.prepare(model, args.config, example)
    _done(start)
    start = _progress(f"saving {args.out}")
    mxfx.save(prepared, args.out)
    _done(start)
    print(mxfx.summary(prepared).table())


def _cmd_checkpoint(args) -> None:
    import mxfx

    start = _progress(f"building {args.model}")
    model, example = _example_inputs(args)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    _done(start)
    start = _progress("exporting and quantizing")
    prepared = mxfx.prepare(model, args.config, example)
    _done(start)
    start = _progress(f"writing a {args.format} checkpoint to {args.out}")
    written = mxfx.save_pretrained(prepared, args.out, format=args.format, model=model, tokenizer=tokenizer)
    _done(start)
    print(f"wrote {written}")


def _cmd_inspect(args) -> None:
    import mxfx

    start = _progress(f"loading {args.file}")
    module = mxfx.load(args.file)
    _done(start)
    summary = mxfx.summary(module)
    print({"table": summary.table, "markdown": summary.to_markdown, "csv": summary.to_csv, "json": summary.to_json}[args.format]())
    if args.graph:
        print(mxfx.graph_text(module))
    if args.svg:
        print(f"wrote {mxfx.draw(module, args.svg)}")


def _example_inputs(args):
    model, example = load_factory(args.model)
    if args.inputs:
        example = parse_inputs(args.inputs)
    if example is None:
        raise MXValueError("no example inputs: pass --inputs (e.g. 2x16:int64) or return (model, inputs) from the factory")
    return model, example if isinstance(example, tuple) else (example,)


def _print_progress(done: int, total: int, elapsed: float, label: str) -> None:
    eta = elapsed / done * (total - done)
    print(f"mxfx: {done}/{total} {label}  {elapsed:.1f} s elapsed, ~{eta:.1f} s left", file=sys.stderr, flush=True)


def _cmd_sensitivity(args) -> None:
    import mxfx
    from mxfx.analysis.sensitivity import parse_candidates

    model, example = _example_inputs(args)
    if args.candidates and args.formats:
        raise MXValueError("pass --formats or --candidates, not both")
    candidates = parse_candidates(args.candidates) if args.candidates else None
    formats = None if candidates else (args.formats or "fp8_e4m3,fp6_e2m3,fp4_e2m1,int8").split(",")
    if args.fresh:
        Path(args.out).unlink(missing_ok=True)
    report = mxfx.sensitivity(model, example, formats, candidates=candidates, mode=args.mode, metric=args.metric,
                              kinds=args.kinds.split(","), block_size=args.block_size, progress=_print_progress,
                              resume=args.out, noise=args.noise)
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank has the report; rank 0 prints it
        return
    print(report.to_markdown() if args.md else report.table())
    if args.plot:
        print(f"wrote {report.plot(args.plot)}")


def _cmd_search(args) -> None:
    import mxfx
    from mxfx.analysis.sensitivity import parse_candidates

    model, example = _example_inputs(args)
    if (args.budget_bits is None) == (args.budgets is None):
        raise MXValueError("pass --budget-bits B (one config) or --budgets B1,B2,... (a front)")
    choice = {"candidates": parse_candidates(args.candidates)} if args.candidates else {"formats": args.formats.split(",")}
    common = dict(choice, act_budget_bits=args.act_budget_bits, mode=args.mode, metric=args.metric,
                  sites=args.sites.split(",") if args.sites else None, progress=_print_progress, noise=args.noise)
    if args.budget_bits is not None:
        _, result = mxfx.search(model, example, budget_bits=args.budget_bits, toml_path=args.out, **common)
        act = "" if result.average_activation_bits is None else f", activation bits {result.average_activation_bits:.3f}"
        spread = ("" if result.spread is None else
                  f" (spread over the noise runs: MSE {result.spread['mse']:.3g}, SQNR {result.spread['sqnr']:.3g} dB)")
        print(f"average bits per weight: {result.average_bits:.3f}{act}; predicted loss {result.predicted['loss']:.4g}, "
              f"measured MSE {result.measured['mse']:.4g}, SQNR {result.measured['sqnr']:.2f} dB{spread}")
        for site, (weight, activation) in result.assignment.items():
            print(f"  {site}: {weight}" if weight == activation else f"  {site}: weight {weight}, activation {activation}")
        print(f"wrote {args.out}")
        return
    front = mxfx.search(model, example, budgets=[float(b) for b in args.budgets.split(",")], plot=args.plot, **common)
    print(front.table())
    stem = args.out.removesuffix(".toml")
    for point in front.searched():
        path = f"{stem}_{point.result.budget_bits:g}bits.toml"
        with open(path, "w") as handle:
            handle.write(point.result.toml)
        print(f"wrote {path}")
    if args.plot:
        print(f"wrote {args.plot}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mxfx", description="MX (microscaling) quantization for PyTorch 2 graphs")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("formats", help="print the MX element format table").set_defaults(run=_cmd_formats)
    quantize = commands.add_parser("quantize", help="prepare a model and save it as a .pt2 file")
    quantize.add_argument("model", help="package.module:factory returning a model or (model, example_inputs)")
    quantize.add_argument("--config", required=True, help="preset name or TOML path")
    quantize.add_argument("--inputs", help="example inputs, e.g. '2x16:int64' or '8x64,8x64'")
    quantize.add_argument("--out", required=True, help="output .pt2 file")
    quantize.set_defaults(run=_cmd_quantize)
    checkpoint = commands.add_parser("checkpoint", help="prepare a Hugging Face model and write a checkpoint "
                                     "other runtimes load (compressed-tensors, quark, gguf)")
    checkpoint.add_argument("model", help="package.module:factory returning a transformers model or (model, example_inputs)")
    checkpoint.add_argument("--config", required=True, help="preset name or TOML path (packed weights)")
    checkpoint.add_argument("--format", required=True, choices=["compressed-tensors", "quark", "gguf"])
    checkpoint.add_argument("--inputs", help="example inputs, e.g. '2x16:int64'")
    checkpoint.add_argument("--tokenizer", help="a tokenizer folder to save with the checkpoint")
    checkpoint.add_argument("--out", required=True, help="output folder (gguf: a folder or a .gguf file)")
    checkpoint.set_defaults(run=_cmd_checkpoint)
    inspect = commands.add_parser("inspect", help="summarize a .pt2 file written by mxfx")
    inspect.add_argument("file")
    inspect.add_argument("--graph", action="store_true", help="print the annotated graph")
    inspect.add_argument("--svg", help="draw the graph to this SVG/PNG file (needs Graphviz)")
    inspect.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table")
    inspect.set_defaults(run=_cmd_inspect)
    sens = commands.add_parser("sensitivity", help="per-site sensitivity report (linear and attention sites)")
    sens.add_argument("model")
    sens.add_argument("--inputs")
    sens.add_argument("--formats", help="formats f, each the candidate (f, f) (default fp8_e4m3,fp6_e2m3,fp4_e2m1,int8)")
    sens.add_argument("--candidates", help="weight:activation pairs, e.g. fp4_e2m1:fp8_e4m3,fp8_e4m3,fp4_e2m1:none")
    sens.add_argument("--mode", choices=["local", "isolated", "all-but-one", "gradient"], default="local")
    sens.add_argument("--metric", choices=["loss", "sqnr", "mse", "cosine", "kl", "rel_error"], default="loss")
    sens.add_argument("--kinds", default="linear,attention", help="site kinds to measure (default linear,attention)")
    sens.add_argument("--block-size", type=int, default=32)
    sens.add_argument("--out", required=True, help="report JSON; an existing file from the same run is resumed, "
                      "one from another run is refused")
    sens.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming it")
    sens.add_argument("--md", action="store_true", help="print Markdown")
    sens.add_argument("--plot", help="heat map PNG/SVG (needs matplotlib)")
    sens.add_argument("--noise", type=int, default=0, metavar="N",
                      help="isolated/all-but-one: measure a noise floor per candidate (N 1-ulp jitters + a batch split); "
                      "rows within it of no change are marked ~")
    sens.set_defaults(run=_cmd_sensitivity)
    search = commands.add_parser("search", help="mixed-precision search under a bits-per-weight budget (or a front)")
    search.add_argument("model")
    search.add_argument("--inputs")
    search.add_argument("--formats", default="fp8_e4m3,fp6_e2m3,fp4_e2m1", help="shorthand for (f, f) candidates")
    search.add_argument("--candidates", help="weight:activation pairs, e.g. fp4_e2m1:fp8_e4m3,fp6_e2m3 ('none': high precision)")
    search.add_argument("--budget-bits", type=float, help="one budget: write one config to --out")
    search.add_argument("--budgets", help="several budgets, e.g. 4.5,5.25,6.25: a front; --out X.toml writes X_<B>bits.toml each")
    search.add_argument("--act-budget-bits", type=float, help="also bound the average activation bits")
    search.add_argument("--mode", choices=["gradient", "local", "isolated", "all-but-one"], default="gradient")
    search.add_argument("--metric", choices=["mse", "sqnr", "cosine", "kl", "rel_error"], default="mse")
    search.add_argument("--sites", help="comma-separated site names to search (others stay in high precision)")
    search.add_argument("--plot", help="front plot PNG/SVG (with --budgets; needs matplotlib)")
    search.add_argument("--noise", type=int, default=0, metavar="N",
                        help="evaluate every config also under N 1-ulp jitters + a batch split: a spread column, "
                        "~ on searched points within the spread of their uniform reference, error bars in the plot")
    search.add_argument("--out", required=True, help="TOML config to write")
    search.set_defaults(run=_cmd_search)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("mxfx: interrupted", file=sys.stderr)
        return 1
    except Exception as error:
        if args.debug:
            raise
        print(f"mxfx: error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
