"""What every command shares: options, opening the library, errors and output streams."""

from __future__ import annotations

import errno
import functools
import json
import re
import shutil
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, TypeVar

import typer

from clipdex.search.catalog.types import database_errors
from clipdex.search.errors import ClipdexError, LibraryNotFound
from clipdex.search.library import Library
from clipdex.search.encoders.model import DEFAULT_MODEL, DEFAULT_PRETRAINED, MODEL_PRESETS, ModelSpec



class LazyConsole:
    """A rich `Console`, made (and rich imported) when first used: a command that writes its
    results straight to stdout (paths, JSON) and has nothing to report does not pay for it."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Any = None

    @property
    def real(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_options", "_console"):
            raise AttributeError(name)
        return getattr(self.real, name)


# Results go to stdout; progress, warnings and errors to stderr.
out = LazyConsole(highlight=False, soft_wrap=True)
err = LazyConsole(stderr=True, highlight=False, soft_wrap=True)


def escape(text: str) -> str:
    """`text` for a message on a rich console: markup escaped, control characters shown (`controls_escaped`)."""
    from rich.markup import escape as rich_escape

    return rich_escape(controls_escaped(text))


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: a terminal acts on them
C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r"}


def controls_escaped(text: str) -> str:
    """`text` with its control characters shown as `ls -b` shows them in a file name (`\\n`,
    `\\t`..., else in octal: ESC is `\\033`), so that a name cannot clear the screen, move
    the cursor or retitle the terminal it is printed on."""
    if not CONTROL_CHARACTERS.search(text):
        return text
    return CONTROL_CHARACTERS.sub(lambda match: C_ESCAPES.get(match.group(), f"\\{ord(match.group()):03o}"), text)


DEBUG = {"enabled": False}


def default_library_shown() -> str:
    """Where a command finds the library without --library, for its help."""
    from clipdex.search.paths import LIBRARY_ENV, user_data_dir

    where = user_data_dir() / "library"
    try:
        shown = f"~/{where.relative_to(Path.home()).as_posix()}"
    except ValueError:
        shown = str(where)
    return f"${LIBRARY_ENV}, else {shown}"


DEMO_MODEL = "demo"  # --model demo: the project's own small model, shipped in the wheel (data/README.md)
DEMO_FILES = ("clipdex-demo.json", "clipdex-demo.pt")

# What an option takes when it takes one of a set: click checks the value, and help shows the choices
Device = Literal["auto", "cpu", "cuda"]
Runtime = Literal["auto", "torch", "onnx"]

LibraryOption = typer.Option(
    None, "--library", "-l", help=f"Library directory [default: {default_library_shown()}]", show_default=False
)
ModelOption = typer.Option(
    None, "--model",
    help=f"open_clip model name, model-config JSON file, '{DEMO_MODEL}' (the small demo model shipped with clipdex, "
         f"offline: it knows coloured shapes only), or {', '.join(MODEL_PRESETS)} (open_clip's multilingual models) "
         f"[default: the library's, else {DEFAULT_MODEL}]",
    show_default=False,
)
PretrainedOption = typer.Option(
    None,
    "--pretrained",
    help=f"pretrained tag, local checkpoint file, or 'none' (random weights) [default: the library's, else {DEFAULT_PRETRAINED}]",
    show_default=False,
)
DeviceOption = typer.Option("auto", "--device", help="auto: CUDA when available (fp16 there), else the CPU")
RuntimeOption = typer.Option(
    "auto", "--runtime",
    help="What runs the model: auto (onnxruntime on the CPU once the library has its verified ONNX export, "
         "torch on a GPU or before), torch, or onnx", case_sensitive=False,
)
JsonOption = typer.Option(False, "--json", help="Print JSON on stdout")
CatalogOption = typer.Option(
    None, "--catalog", metavar="URL",
    help="When making a library: a shared PostgreSQL catalog at this URL (postgresql+psycopg://USER@HOST:PORT/DB) "
         "instead of a SQLite file of its own; one that holds a library already is attached to. The password "
         "comes from $CLIPDEX_CATALOG_URL, PGPASSWORD or ~/.pgpass, never from this option",
    show_default=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(function: F) -> F:
    """Turn the library's own exceptions into a one-line message and exit code 1."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            if not isinstance(error, (ClipdexError, OSError) + database_errors()):
                raise
            if DEBUG["enabled"]:
                traceback.print_exc()
            err.print(f"[bold red]Error:[/] {describe_error(error)}", markup=True, highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("Interrupted.")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def describe_error(error: BaseException) -> str:
    """One line for the user: the library's own message, or the file and the reason."""
    if isinstance(error, LibraryNotFound):
        return escape(f"no clipdex library at {error.path} - index something first (clipdex index PATH) "
                      "or point --library at an existing library")
    if isinstance(error, ClipdexError):
        return escape(cli_wording(str(error)))
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        if error.errno in DISK_FULL:
            return escape(f"{where}{DISK_FULL[error.errno]}: {DISK_FULL_HINT}")
        return escape(f"{where}{error.strerror or error}")
    original = getattr(error, "orig", None) or error
    if "database or disk is full" in str(original):
        return escape(f"catalog: {DISK_FULL[errno.ENOSPC]} (SQLite: {original}): {DISK_FULL_HINT}")
    return escape(f"catalog database error: {str(original).splitlines()[0]} (run with --debug for details)")


# The library's errors name its Python arguments (`after=`, `runtime="torch"`, `model=`): the CLI
# says its flags instead. An argument given a quoted value reads as the flag and the value.
CLI_FLAGS = {
    "after": "--after", "before": "--before", "like": "--like", "vector": "--vector", "kind": "--kind",
    "min_width": "--min-width", "min_height": "--min-height", "runtime": "--runtime", "device": "--device",
    "model": "--model/--pretrained", "catalog": "--catalog", "model_name": "--model-name",
}
LIBRARY_ARGUMENT = re.compile(r'(?<![\w.-])(' + "|".join(CLI_FLAGS) + r')=(?:"([^"]*)"|(?=[\s,;:/)]|$))?')


def cli_wording(message: str) -> str:
    """A library error's message with its arguments said as the CLI's flags: `after=2024-13-01`
    reads `--after 2024-13-01`, `runtime="torch"` reads `--runtime torch`, `like=` reads `--like`."""

    def flag(match: re.Match[str]) -> str:
        name, quoted = match.group(1), match.group(2)
        if quoted is not None:
            return f"{CLI_FLAGS[name]} {quoted}"
        follows = message[match.end():match.end() + 1]
        return CLI_FLAGS[name] if follows in ("", ",", ";", ":", "/", ")", "?", ".") or follows.isspace() else f"{CLI_FLAGS[name]} "

    return LIBRARY_ARGUMENT.sub(flag, message)


DISK_FULL = {errno.ENOSPC: "no space left on device (ENOSPC)", errno.EDQUOT: "disk quota exceeded (EDQUOT)"}
DISK_FULL_HINT = "free some space and run the same command again; everything committed so far is kept"


def demo_model_files() -> tuple[Path, Path]:
    """The demo model's config and weights: `clipdex/demo_model/` where clipdex is installed
    from its wheel, `data/demo-model/` in a checkout (an editable install)."""
    import clipdex

    for folder in (Path(clipdex.__file__).parent / "demo_model", Path(__file__).resolve().parents[1] / "data" / "demo-model"):
        config, weights = (folder / name for name in DEMO_FILES)
        if config.is_file() and weights.is_file():
            return config, weights
    raise ClipdexError("--model demo: the demo model is not installed with this clipdex (clipdex/demo_model/ "
                       "or a checkout's data/demo-model/); reinstall clipdex, or pass --model CONFIG.json --pretrained FILE")


def model_spec(model: Optional[str], pretrained: Optional[str]) -> Optional[ModelSpec]:
    """The model the user asked for, or None to use the library's own."""
    if model is None and pretrained is None:
        return None
    if model == DEMO_MODEL:
        config, weights = demo_model_files()
        return ModelSpec(str(config), pretrained or str(weights))
    if model in MODEL_PRESETS:
        name, tag = MODEL_PRESETS[model]
        return ModelSpec(name, pretrained or tag)
    if model is not None and pretrained is None and model != DEFAULT_MODEL:
        raise ClipdexError(
            f"--model {model} needs --pretrained: a pretrained tag, a local checkpoint file, "
            "or 'none' for random weights"
        )
    return ModelSpec(model or DEFAULT_MODEL, pretrained or DEFAULT_PRETRAINED)


@contextmanager
def discard_new_library_on_error(lib: Library) -> Iterator[None]:
    """A library made by this command and still empty is removed again when the command fails
    (say the model's weights cannot be fetched), so a retry with other options starts clean."""
    try:
        yield
    except BaseException:
        if lib.created and sum(lib.catalog.counts().values()) == 0:
            lib.close()
            shutil.rmtree(lib.path, ignore_errors=True)
        raise


def open_library(library: Optional[Path], model: Optional[str] = None, pretrained: Optional[str] = None,
                 device: str = "auto", create: bool = False, catalog: Optional[str] = None,
                 runtime: str = "auto") -> Library:
    spec = model_spec(model, pretrained)
    runtime = check_runtime(runtime)
    return opened(Library.open(library, model=spec, create=create, device=device, catalog=catalog,
                               runtime=runtime))


OPENED: list[Library] = []  # the libraries this command opened, closed when it ends


def opened(library: Library) -> Library:
    """`library`, to be closed when the command ends (`close_opened`)."""
    OPENED.append(library)
    return library


def close_opened() -> None:
    """Close the libraries the command opened: their catalogs' connections, whose closing
    checkpoints SQLite's write-ahead log into the catalog file."""
    while OPENED:
        library = OPENED.pop()
        try:
            library.close()
        except Exception as error:  # the command's own outcome stands
            err.print(f"[dim]closing {library.path}: {error}[/dim]")


def check_runtime(runtime: str) -> str:
    from clipdex.search.encoders.factory import RUNTIMES

    if runtime.lower() not in RUNTIMES:
        raise ClipdexError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    return runtime.lower()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()
