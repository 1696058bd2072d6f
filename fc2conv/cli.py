"""Click commands only: parse options, call the library, pick a renderer, map errors to exit codes.

Exit codes: 0 success; 1 a numeric check failed; 2 bad usage or an input that cannot be read or
converted; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from fc2conv._version import __version__
from fc2conv.errors import DependencyError, Fc2ConvError, Remedy
from fc2conv.layouts import LayoutChoice
from fc2conv.names import printable
from fc2conv.publish import published
from fc2conv.shapes import parse_shape
from fc2conv.types import FLATTEN_ORDERS, FlattenOrder, ShapeSpec

if TYPE_CHECKING:
    from fc2conv.formats import Source
    from fc2conv.results import ConvertResult, VerifyResult

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143

# What to do about an error, in this command line's words (the library's messages name no flags).
REMEDIES: dict[Remedy, str] = {
    "overwrite": "pass --force to replace it",
    "choose_output": "choose another -o",
    "input_shape": "pass --input-shape CxHxW",
    "model_input_shape": "pass --input-shape CxHxW, the network's input (e.g. 3x224x224)",
    "trust_pickle": "or, for a file you trust, pass --trust-pickle",
    "model": "pass --model package.module:factory",
    "inspect": "run 'fc2conv inspect' to see what the checkpoint holds",
    "weight_layout": "pass --weight-layout out-in (PyTorch's Linear) or in-out (GPT-2 Conv1D, Keras Dense)",
    "trust_shape": "if the map really is not that layer's output (a concatenation, ...), pass --trust-shape",
}


def error_message(exc: Fc2ConvError) -> str:
    """The one line a user reads: the library's message, then what to pass (or install) to fix it."""
    if isinstance(exc, DependencyError):  # fc2conv is installed from its folder, not from an index
        return f'{exc}; install it from fc2conv\'s folder: pip install -e ".[{exc.extra}]"'
    remedy = REMEDIES.get(exc.remedy) if exc.remedy else None
    return f"{exc}; {remedy}" if remedy else str(exc)


class _Signalled(BaseException):
    """SIGINT or SIGTERM: unwinds like an exception, so the same clean-up runs (no half-written output)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Run:
    """What the running command has put in place, so that an interrupt is reported as it happened."""

    def __init__(self, outputs: int = 0) -> None:
        self.outputs = outputs  # how many outputs the command writes (set by the command)
        self.start = len(published())

    def written(self) -> tuple[Path, ...]:
        return published()[self.start :]

    def finished(self) -> bool:
        """Every output of the command is in place: it has succeeded, whatever comes now."""
        return self.outputs > 0 and len(self.written()) >= self.outputs


_run = _Run()


def _on_signal(signum: int, frame: object) -> None:
    if _run.finished():
        return  # once the output is renamed into place the run has succeeded: it finishes and says so
    raise _Signalled(signum)


def _interrupted(what: str) -> str:
    written = _run.written()
    if not written:
        return f"{what}; no output was written"
    return f"{what} after writing {', '.join(map(str, written))}; no other output was written"


class ShapeType(click.ParamType):
    """``256x4x4``, ``256,4,4``, ``4x4`` or ``256``; a bad shape is a usage error (exit 2)."""

    name = "CxHxW"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> ShapeSpec:
        if isinstance(value, ShapeSpec):
            return value
        try:
            return parse_shape(str(value))
        except Fc2ConvError as exc:
            self.fail(str(exc), param, ctx)


SHAPE = ShapeType()
# Existence and permissions are checked by the loader, whose messages say more.
FILE = click.Path(dir_okay=True, readable=False, path_type=Path)


class Fc2ConvGroup(click.Group):
    """Runs commands and turns every failure into one ``Error:`` line and an exit code."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if "--debug" in argv[1:]:  # accepted anywhere, as users type it: after the command too
            argv = ["--debug", *[a for a in argv if a != "--debug"]]
        global _run
        _run = _Run()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = super().main(argv, prog_name or "fc2conv", complete_var, standalone_mode=False, **extra)
        except (click.exceptions.Abort, KeyboardInterrupt):
            code = _fail(_interrupted("interrupted"), EXIT_INTERRUPTED, argv)
        except _Signalled as exc:
            if exc.signum == signal.SIGINT:
                code = _fail(_interrupted("interrupted (Ctrl-C)"), EXIT_INTERRUPTED, argv)
            else:
                code = _fail(_interrupted("terminated (SIGTERM)"), EXIT_TERMINATED, argv)
        except click.ClickException as exc:
            context = getattr(exc, "ctx", None)  # usage errors carry the command they were raised in
            command = context.command_path if context is not None else "fc2conv"
            hint = f" (see '{command} --help')" if isinstance(exc, click.UsageError) else ""
            code = _fail(exc.format_message().rstrip(".") + hint, exc.exit_code, argv)
        except Fc2ConvError as exc:
            if "--debug" in argv:
                traceback.print_exc()
            code = _fail(error_message(exc), exc.exit_code, argv)
        except Exception as exc:  # a bug: still one line, unless --debug asks for the traceback
            if "--debug" in argv:
                raise
            code = _fail(
                f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", EXIT_USAGE, argv
            )
        finally:
            for signum, handler in previous.items():  # in-process callers (tests) get theirs back
                signal.signal(signum, handler)
            if "fc2conv.preload" in sys.modules:  # no exit while torch is half imported on another thread
                sys.modules["fc2conv.preload"].wait_for_torch()
        code = code if isinstance(code, int) else EXIT_OK
        if standalone_mode:
            sys.exit(code)
        return code


def _fail(message: str, code: int, argv: list[str]) -> int:
    """Print the one ``Error:`` line on stderr (and a JSON verdict on stdout with ``--json``)."""
    message = printable(message)  # names from the file cannot break the line (or forge another)
    click.echo(f"Error: {message}", err=True)
    if "--json" in argv:
        click.echo(json.dumps({"ok": False, "error": message, "exit_code": code}))
    return code


def _emit(result: Any, as_json: bool, command: str) -> None:
    """Print ``result`` as one JSON object, or as the command's rich table (rich is imported only then)."""
    if as_json:
        import fc2conv.report_json as report_json

        to_json: Callable[[Any], dict[str, Any]] = getattr(report_json, f"{command}_json")
        click.echo(json.dumps(to_json(result), indent=2))
        return
    import fc2conv.report as report

    render: Callable[[Any, Any], None] = getattr(report, f"render_{command}")
    render(report.make_console(), result)


def _progress_bar(as_json: bool) -> Any:
    """A progress bar for the terminal (it shows itself only for large jobs); none with --json."""
    if as_json:
        return nullcontext()
    import fc2conv.report as report

    return report.ByteProgress(report.make_console())


def _finish(result: ConvertResult | VerifyResult, as_json: bool, command: str) -> int:
    """Print the result; when a check failed, also one ``Error:`` line saying which and why (exit 1)."""
    _emit(result, as_json, command)
    if result.ok:
        return EXIT_OK
    failures = result.failures
    shown = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
    what = "check failed" if len(failures) == 1 else f"{len(failures)} checks failed"
    written = "" if command != "convert" or getattr(result, "written", True) else "; no output was written"
    click.echo(printable(f"Error: {what}: {shown}{written}"), err=True)
    return EXIT_CHECK_FAILED


def _warn(lines: list[str]) -> None:
    for line in lines:
        click.echo(f"Warning: {printable(line)}", err=True)


@click.group(
    name="fc2conv",
    cls=Fc2ConvGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, "--version", prog_name="fc2conv")
@click.option("--debug", is_flag=True, help="Show a traceback for errors (for bug reports); anywhere on the line.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Turn a network's fully connected layers into convolutions, and prove they compute the same.

    \b
    Exit codes: 0 success, 1 a numeric check failed, 2 bad usage or unreadable input.
    """
    if ctx.invoked_subcommand is None:  # bare `fc2conv`: the help, as git and pip do, and success
        click.echo(ctx.get_help())


_MAP_HELP = (
    "Feature map flattened into the first FC layer: CxHxW (256x4x4 or 256,4,4), HxW, or C (square map). "
    "Default: C from the last conv (or BatchNorm) before the first FC, square map; a Keras model says it."
)


def _shape_option(extra: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--input-shape", type=SHAPE, default=None, help=_MAP_HELP + extra)


_CONVERT_SHAPE = (
    " With --model: the network's input instead (CxHxW, e.g. 3x224x224). With an .onnx graph: its input, where the "
    "graph leaves the size open."
)
_order_help = (
    "How the source flattened the map: chw (PyTorch) or hwc (Keras/TensorFlow channels-last). Default: what a "
    "model file says (a Keras config), else chw."
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout, nothing else.")
_trust_option = click.option(
    "--trust-pickle",
    is_flag=True,
    help="Unpickle arbitrary objects (torch.load weights_only=False), e.g. a whole saved nn.Module. "
    "This RUNS ANY CODE THE FILE CONTAINS: only for files you trust.",
)


def _model_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--model", metavar="PACKAGE.MODULE:FACTORY", default=None, help=help_text)


_CONVERT_MODEL = (
    "Convert the model, not only its weights: FACTORY() builds it (imported from the current folder too), "
    "CHECKPOINT's weights are loaded strictly, and --input-shape is then the NETWORK input, e.g. 3x224x224."
)
_VERIFY_MODEL = (
    "Also check end to end: FACTORY() builds the model, ORIGINAL's weights go into it and CONVERTED's into its "
    "conversion, and both run (at --input-shape, the NETWORK input, e.g. 3x224x224, and on a larger input, "
    "position by position)."
)


_strict_option = click.option("--strict", is_flag=True, help="Fail layers with NaN/Inf weights (exit 1).")
_key_option = click.option(
    "--state-dict-key",
    metavar="KEY",
    default=None,
    help="Where a training checkpoint keeps the weights to read: a key such as model_ema, or a dotted path "
    "(checkpoint.state_dict). Default: the first of state_dict, model_state_dict, model, ... (training weights "
    "before EMA copies); the key taken and those passed over are reported.",
)
_LAYOUTS: dict[str, LayoutChoice] = {"auto": "auto", "out-in": "out_in", "in-out": "in_out"}
_layout_option = click.option(
    "--weight-layout",
    type=click.Choice(list(_LAYOUTS)),
    default="auto",
    show_default=True,
    help="How FC weights are stored: out-in (PyTorch's Linear), in-out (GPT-2's Conv1D, Keras's Dense), or auto: "
    "out-in unless a bias or a config.json beside the file shows in-out.",
)
_trust_shape_option = click.option(
    "--trust-shape",
    is_flag=True,
    help="Use --input-shape even where the checkpoint shows another channel count (the last conv or "
    "BatchNorm before the first FC): for maps that are not that layer's output, such as a concatenation.",
)


def _trust_warning(trust_pickle: bool, *paths: Path) -> None:
    if trust_pickle:
        names = ", ".join(str(p) for p in paths)
        _warn(
            [
                f"--trust-pickle: unpickling {names} with weights_only=False runs any code the file holds; "
                "use it only on files you trust"
            ]
        )


@cli.command()
@click.argument("checkpoint", type=FILE)
@_shape_option(_CONVERT_SHAPE)
@click.option(
    "-o",
    "--output",
    type=click.Path(),  # a string: a trailing '/' (a folder) must reach the library
    default=None,
    help="Output safetensors file. Default: <stem>.conv.safetensors beside the input.",
)
@click.option("--flatten-order", type=click.Choice(FLATTEN_ORDERS), default=None, help=_order_help)
@click.option("--layers", metavar="REGEX", default=None, help="Only FC layers whose name matches REGEX.")
@click.option(
    "--pointwise",
    is_flag=True,
    help="Turn every Linear layer (those matching --layers) into a 1x1 conv, (out, in) -> (out, in, 1, 1): "
    "the layout NPUs want for projections. No flatten geometry.",
)
@click.option("--force", is_flag=True, help="Replace an existing output file (never the input).")
@_model_option(_CONVERT_MODEL)
@click.option(
    "--export",
    "export_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --model: also save a torch.export program of the converted model (dynamic H and W).",
)
@click.option(
    "--onnx",
    "onnx_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --model: also save ONNX (dynamic H and W; needs the onnx extra), run with onnxruntime if installed.",
)
@click.option(
    "--dense",
    is_flag=True,
    help="With an ONNX graph as input: drop the flatten and open the input's height and width, so the model "
    "returns a map of scores (N, K, H', W') on larger inputs (checked position by position).",
)
@click.option(
    "--keras-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="With a Keras model as input: also write the fully convolutional Keras model (FILE.keras; input of any "
    "size), proven in Keras before it is written. Needs keras (the keras-export extra).",
)
@click.option(
    "--fold-batchnorm",
    is_flag=True,
    help="With --model: fold an eval-mode BatchNorm1d that follows a Linear into the conv.",
)
@_layout_option
@_trust_shape_option
@_key_option
@_strict_option
@_trust_option
@_json_option
def convert(
    checkpoint: Path,
    input_shape: ShapeSpec | None,
    output: str | None,
    flatten_order: FlattenOrder | None,
    layers: str | None,
    pointwise: bool,
    force: bool,
    model: str | None,
    export_path: str | None,
    onnx_path: str | None,
    dense: bool,
    keras_out: str | None,
    fold_batchnorm: bool,
    weight_layout: str,
    trust_shape: bool,
    state_dict_key: str | None,
    strict: bool,
    trust_pickle: bool,
    as_json: bool,
) -> int:
    """Rewrite the FC layers of CHECKPOINT as conv kernels and write safetensors.

    CHECKPOINT is a .pt/.pth/.bin/.ckpt or .safetensors file, or a sharded Hugging Face checkpoint
    (its *.safetensors.index.json, or the folder): then -o names a folder that gets the converted
    shards and a new index. Every converted layer is checked numerically from the written file
    before it is published; a failed check leaves no output and exits 1.
    """
    from fc2conv.formats import open_source
    from fc2conv.report_json import warnings_for

    if pointwise and (input_shape is not None or flatten_order is not None):
        raise click.UsageError("--pointwise takes no --input-shape or --flatten-order: it has no flatten geometry")
    _trust_warning(trust_pickle, checkpoint)
    _run.outputs = 1 + sum(path is not None for path in (export_path, onnx_path, keras_out))
    # Read once, then branch on what the file holds.
    source = open_source(checkpoint, trust_pickle=trust_pickle, input_shape=input_shape, state_dict_key=state_dict_key)
    if source.format == "onnx":
        return _convert_onnx(source, output, dense, force, as_json, model, pointwise, layers, flatten_order,
                             export_path or onnx_path or keras_out or fold_batchnorm)  # fmt: skip
    if dense:
        raise click.UsageError("--dense rewrites an ONNX graph: CHECKPOINT must be an .onnx file")
    if model is not None or source.module is not None:
        if pointwise or layers is not None or flatten_order is not None:
            raise click.UsageError("--model converts the module's own head: no --pointwise, --layers, --flatten-order")
        from fc2conv.jobs.model import convert_model_source

        result = convert_model_source(
            source, output, model=model, input_shape=input_shape, fold_batchnorm=fold_batchnorm,
            export=export_path, onnx=onnx_path, overwrite=force,
        )  # fmt: skip
        return _finish(result, as_json, "convert")
    if export_path or onnx_path or fold_batchnorm:
        raise click.UsageError("--export, --onnx and --fold-batchnorm need --model (the network to rebuild)")
    from fc2conv.jobs.convert import convert_source

    with _progress_bar(as_json) as progress:
        result = convert_source(
            source, output, input_shape=input_shape, flatten_order=flatten_order, layers=layers,
            pointwise=pointwise, weight_layout=_LAYOUTS[weight_layout], trust_shape=trust_shape, overwrite=force,
            strict=strict, progress=progress, keras_out=keras_out,
        )  # fmt: skip
    _warn(warnings_for(result))
    return _finish(result, as_json, "convert")


def _refuse_for_onnx(**options: object) -> None:
    """An ONNX graph states its own heads, order and layers: the options that choose them do not apply."""
    given = [f"--{name.replace('_', '-')}" for name, value in options.items() if value is not None]
    if given:
        raise click.UsageError(f"an ONNX graph states its own heads, order and layers: no {', '.join(given)}")


def _convert_onnx(source: Source, output: str | None, dense: bool, force: bool, as_json: bool, *flags: object) -> int:
    """``convert model.onnx``: the graph's heads become Conv nodes; the options of checkpoints do not apply."""
    if any(flags):
        raise click.UsageError(
            "an ONNX graph says its own heads, order and layers: no --model, --pointwise, --layers, "
            "--flatten-order, --export, --onnx, --keras-out or --fold-batchnorm"
        )
    from fc2conv.jobs.onnx import convert_onnx_source

    return _finish(convert_onnx_source(source, output, dense=dense, overwrite=force), as_json, "convert")


@cli.command()
@click.argument("checkpoint", type=FILE)
@_shape_option(" With an .onnx graph: its input, where the graph leaves the size open.")
@click.option("--flatten-order", type=click.Choice(FLATTEN_ORDERS), default=None, help=_order_help)
@click.option("--layers", metavar="REGEX", default=None, help="Only FC layers whose name matches REGEX.")
@_layout_option
@_trust_shape_option
@_key_option
@click.option(
    "--evidence",
    is_flag=True,
    help="Also weigh what the first head's weights say of the flatten order (and of the map, if inferred). "
    "Reads a sample of those weights' rows where inspect otherwise reads shapes only.",
)
@_trust_option
@_json_option
def inspect(
    checkpoint: Path,
    input_shape: ShapeSpec | None,
    flatten_order: FlattenOrder | None,
    layers: str | None,
    weight_layout: str,
    trust_shape: bool,
    state_dict_key: str | None,
    evidence: bool,
    trust_pickle: bool,
    as_json: bool,
) -> int:
    """List the layers of CHECKPOINT, the FC chain and the geometry convert would use.

    For .safetensors (single, or sharded: an index or a folder of shards) only the headers are read.
    """
    from fc2conv.jobs.inspect import inspect_file

    if checkpoint.suffix == ".onnx":
        _refuse_for_onnx(flatten_order=flatten_order, layers=layers, state_dict_key=state_dict_key)

    _trust_warning(trust_pickle, checkpoint)
    result = inspect_file(
        checkpoint, input_shape=input_shape, flatten_order=flatten_order, layers=layers,
        weight_layout=_LAYOUTS[weight_layout], trust_shape=trust_shape, trust_pickle=trust_pickle,
        state_dict_key=state_dict_key, evidence=evidence,
    )  # fmt: skip
    from fc2conv.report_json import warnings_for

    _warn(warnings_for(result))
    _emit(result, as_json, "inspect")
    return EXIT_OK


@cli.command()
@click.argument("original", type=FILE)
@click.argument("converted", type=FILE)
@_shape_option(
    " Cross-checks the geometry the converted file records. With --model: the network's input (CxHxW). "
    "With an .onnx graph: its input, where the graph leaves the size open."
)
@click.option(
    "--flatten-order",
    type=click.Choice(FLATTEN_ORDERS),
    default=None,
    help=_order_help + " Default: as recorded in CONVERTED, else chw.",
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    default=None,
    help="Absolute tolerance. Default per dtype: float64 1e-10, float32 1e-5, float16 1e-2, bfloat16 5e-2.",
)
@click.option(
    "--rtol",
    type=click.FloatRange(min=0),
    default=None,
    help="Tolerance relative to the largest output. Default per dtype, as --atol.",
)
@_model_option(_VERIFY_MODEL)
@_key_option
@_strict_option
@_trust_option
@_json_option
def verify(
    original: Path,
    converted: Path,
    input_shape: ShapeSpec | None,
    flatten_order: FlattenOrder | None,
    atol: float | None,
    rtol: float | None,
    model: str | None,
    state_dict_key: str | None,
    strict: bool,
    trust_pickle: bool,
    as_json: bool,
) -> int:
    """Check that CONVERTED computes what ORIGINAL does: exit 0 if so, 1 if not.

    Converted layers are checked numerically (traced size and sliding window); every other tensor
    must be bit-for-bit identical. Either side may be a sharded checkpoint (index or folder).
    """
    from fc2conv.formats import open_source
    from fc2conv.report_json import warnings_for

    _trust_warning(trust_pickle, original, converted)
    original_source = open_source(
        original, trust_pickle=trust_pickle, input_shape=input_shape, state_dict_key=state_dict_key
    )
    if original_source.format == "onnx":
        from fc2conv.jobs.onnx import verify_onnx_sources

        _refuse_for_onnx(flatten_order=flatten_order, model=model, state_dict_key=state_dict_key)
        result = verify_onnx_sources(original_source, converted, atol=atol, rtol=rtol)
        return _finish(result, as_json, "verify")
    converted_source = open_source(converted, trust_pickle=trust_pickle)
    if model is not None or original_source.module is not None:
        from fc2conv.jobs.model import verify_model_sources

        result = verify_model_sources(
            original_source, converted_source, model=model, input_shape=input_shape, atol=atol, rtol=rtol
        )
        return _finish(result, as_json, "verify")
    from fc2conv.jobs.verify import verify_sources

    result = verify_sources(
        original_source, converted_source, input_shape=input_shape, flatten_order=flatten_order, atol=atol,
        rtol=rtol, strict=strict,
    )  # fmt: skip
    _warn(warnings_for(result))
    return _finish(result, as_json, "verify")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point (``fc2conv``): the command, then a quick exit.

    numpy's OpenBLAS is held to one thread (unless ``OPENBLAS_NUM_THREADS`` is set): the checks'
    products are small (sampled rows against a few maps), and the idle threads it starts otherwise
    spin beside the copy (0.09 s of CPU in a 0.7 s conversion, measured). The process ends without
    tearing the interpreter down (:func:`os._exit`, once the output is flushed): every file is closed
    and fsynced by then, and freeing numpy's and the checks' objects one by one took 0.04 s more.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        cli.main(args=argv, prog_name="fc2conv")
    except SystemExit as done:
        _exit_now(done.code)
    raise AssertionError("unreachable")  # pragma: no cover - cli.main exits


def _exit_now(code: object) -> NoReturn:
    """End the process with ``sys.exit(code)``'s status, its output flushed, without the interpreter's teardown."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): the message on stderr, status 1
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what could be said is lost, the status stays
            pass
    os._exit(status)
