"""The `mxfx` command line (also `python -m mxfx`).

    mxfx formats
    mxfx quantize MODEL --config CONFIG [--inputs SPEC] --out FILE.pt2
    mxfx inspect FILE.pt2 [--graph] [--svg OUT] [--format table|markdown|csv|json]

MODEL is `package.module:factory`; the factory returns a model, or (model, example_inputs).
Exit codes: 0 success, 2 usage error, 1 failure (one line; --debug shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Optional

import torch


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
            raise ValueError(f"unknown dtype {dtype_text!r} in --inputs {spec!r}")
        tensors.append(torch.randint(0, 100, shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape, dtype=dtype))
    return tuple(tensors)


def load_factory(target: str):
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"MODEL must be 'package.module:factory', got {target!r}")
    sys.path.insert(0, ".")
    factory = getattr(importlib.import_module(module_name), attr)
    result = factory()
    return result if isinstance(result, tuple) else (result, None)


def _cmd_formats(args) -> None:
    import mxfx

    print(mxfx.format_table())


def _cmd_quantize(args) -> None:
    import mxfx

    start = _progress(f"building {args.model}")
    model, example = load_factory(args.model)
    if args.inputs:
        example = parse_inputs(args.inputs)
    if example is None:
        raise ValueError("no example inputs: pass --inputs (e.g. 2x16:int64) or return (model, inputs) from the factory")
    example = example if isinstance(example, tuple) else (example,)
    _done(start)
    start = _progress("exporting and quantizing")
    prepared = mxfx.prepare(model, args.config, example)
    _done(start)
    start = _progress(f"saving {args.out}")
    mxfx.save(prepared, args.out)
    _done(start)
    print(mxfx.summary(prepared).table())


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
    inspect = commands.add_parser("inspect", help="summarize a .pt2 file written by mxfx")
    inspect.add_argument("file")
    inspect.add_argument("--graph", action="store_true", help="print the annotated graph")
    inspect.add_argument("--svg", help="draw the graph to this SVG/PNG file (needs Graphviz)")
    inspect.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table")
    inspect.set_defaults(run=_cmd_inspect)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
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
