"""Command line: `pixelrefer ask IMAGE --mask FILE PROMPT`, `notebooks run …`, `data check|shapesworld …`,
`convert SRC DST`, `train …`, `eval …`, `ablate …`.

Each command group registers its own subparser (`_add_ask`, `_add_notebooks`, and
`add_parser` of `pixelrefer.data.check`, `pixelrefer.convert`, `pixelrefer.training`, `pixelrefer.evaluation.runners` and `pixelrefer.analysis.ablations`). Exit codes: 0 success,
1 a notebook failed, 2 usage error (help is printed) or bad input (`ask`: the error names the file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from pixelrefer import convert as convert_commands
from pixelrefer import training as train_commands
from pixelrefer.analysis import ablations as ablate_commands
from pixelrefer.data import check as data_commands
from pixelrefer.evaluation import runners as eval_commands


class _Parser(argparse.ArgumentParser):
    """Prints the full help, not just the usage line, on a usage error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_help(sys.stderr)
        self.exit(2, f"\n{self.prog}: error: {message}\n")


def _parse_parameter(text: str) -> tuple[str, Any]:
    """`NAME=VALUE`, VALUE read as JSON when it parses (numbers, bools, lists), else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _add_notebooks(commands: argparse._SubParsersAction) -> None:
    from pixelrefer.notebook import PRESETS

    notebooks = commands.add_parser("notebooks", help="execute the workbench notebooks")
    actions = notebooks.add_subparsers(dest="action", parser_class=_Parser)
    run = actions.add_parser("run", help="run notebooks with papermill into a new run folder")
    run.add_argument("names", nargs="*", help="notebook stems or prefixes (default: all)")
    run.add_argument("--preset", choices=sorted(PRESETS), default="teaching")
    run.add_argument("--out", default="runs", help="folder that receives the run folder (default: runs)")
    run.add_argument("--notebook-dir", default=None, help="source notebooks (default: the repo's notebooks/)")
    run.add_argument(
        "-p", "--parameter", action="append", type=_parse_parameter, default=[], metavar="NAME=VALUE",
        help="override a notebook parameter (repeatable)",
    )
    run.set_defaults(handler=_notebooks_run)
    notebooks.set_defaults(handler=lambda args: _usage(notebooks))


def _notebooks_run(args: argparse.Namespace) -> int:
    from pixelrefer.notebook import notebook_status, run_notebooks

    try:
        run_dir = run_notebooks(
            args.names or None, args.preset, args.out, dict(args.parameter),
            notebook_dir=args.notebook_dir, keep_going=True,
        )
    except ValueError as exc:  # no notebooks, unknown name: a usage error
        print(f"pixelrefer notebooks run: error: {exc}", file=sys.stderr)
        return 2
    status = notebook_status(run_dir)
    failed = [stem for stem, s in status.items() if s != "ok"]
    summary = f"{len(status) - len(failed)}/{len(status)} notebooks ok"
    if failed:
        summary += f", failed: {', '.join(failed)}"
    print(f"{run_dir}: {summary}")
    return 1 if failed else 0


def _add_ask(commands: argparse._SubParsersAction) -> None:
    ask = commands.add_parser("ask", help="answer a question about regions of an image (embedded default model)")
    ask.add_argument("image", metavar="IMAGE", help="image file (.png, .jpg, …)")
    ask.add_argument("prompt", metavar="PROMPT", help="the question, one <region> per mask, in --mask order")
    ask.add_argument("--mask", action="append", default=[], metavar="FILE", required=True,
                     help="mask file (image, .npy, .npz or .json; repeatable, every mask of a file in its order)")
    ask.add_argument("--model", default="shapes-tiny",
                     help="embedded model name or checkpoint folder (default: shapes-tiny)")
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.set_defaults(handler=_ask)


def _ask(args: argparse.Namespace) -> int:
    """Print the model's answer to PROMPT about IMAGE's masked regions."""
    import numpy as np

    import pixelrefer
    from pixelrefer.data.mask_files import read_mask_file
    from pixelrefer.data.media import read_image
    from pixelrefer.errors import InputError
    from pixelrefer.processing import REGION_PLACEHOLDER

    try:
        image = np.asarray(read_image(Path(args.image), "pixelrefer ask"))
        masks, counts = [], []
        for path in args.mask:
            found = read_mask_file(path, *image.shape[:2])
            masks += found.values()
            counts.append(f"{path} ({len(found)})")
        regions = args.prompt.count(REGION_PLACEHOLDER)
        if regions != len(masks):
            raise InputError(f"the prompt has {regions} {REGION_PLACEHOLDER} but the mask files hold {len(masks)} "
                             f"masks: {', '.join(counts)}")
        model, processor = pixelrefer.load(args.model)
        answer = pixelrefer.ask(model, processor, args.prompt, image=image, masks=masks,
                                max_new_tokens=args.max_new_tokens)
    except (InputError, ValueError) as exc:  # bad files or counts; an unknown model name
        print(f"pixelrefer ask: error: {exc}", file=sys.stderr)
        return 2
    print(answer.text.strip())
    return 0


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pixelrefer", description="PixelRefer workbench")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    _add_ask(commands)
    _add_notebooks(commands)
    data_commands.add_parser(commands)
    convert_commands.add_parser(commands)
    train_commands.add_parser(commands)
    eval_commands.add_parser(commands)
    ablate_commands.add_parser(commands)
    parser.set_defaults(handler=lambda args: _usage(parser))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
