"""The `clipdex` command: parse, call the library, render."""

from __future__ import annotations

import gc
import sys
from typing import Any, Optional, Sequence

import typer
from typer.core import TyperGroup

try:  # typer 0.28 carries its own copy of click, whose exceptions its parser raises
    from typer._click import exceptions as click_exceptions
except ImportError:  # an older typer parses with click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

from clipdex.cli import common


class OneLineUsageErrors(TyperGroup):
    """The `clipdex` group, whose usage errors are plain lines on stderr (the command's usage,
    the help hint, then one `Error: ...` line; exit 2) instead of typer's boxed panel: a line
    can be read in a log, grepped and quoted."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, windows_expand_args: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except click_exceptions.ClickException as error:
            if type(error).__name__ != "NoArgsIsHelpError":  # that one's help is printed already
                print(usage_error_lines(error, getattr(self, "resolved", None)), file=sys.stderr)
            sys.exit(error.exit_code)
        except typer.Abort:  # typer.Abort is click's Abort where typer uses click itself
            print("Aborted.", file=sys.stderr)
            sys.exit(1)
        # Not standalone, click returns the code of a `typer.Exit` raised by the command, or
        # what the command returned (clipdex's return None): exit as standalone click would.
        sys.exit(result if isinstance(result, int) else 0)

    def resolve_command(self, ctx: Any, args: Any) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        # click raises some parse errors without their context (an option missing its value):
        # the command found here gives their usage line
        self.resolved = (ctx, name, command)
        return name, command, rest


def usage_error_lines(error: Any, resolved: Any = None) -> str:
    """The usage of the command that failed, a hint to its help and one `Error: ...` line.
    `resolved`: the (parent context, name, command) of the last command found, for an error
    raised without its context."""
    context = getattr(error, "ctx", None)
    if context is None:
        if resolved is not None and resolved[2] is not None:
            parent, name, command = resolved
            context = type(parent)(command, info_name=name, parent=parent)
    message = " ".join(error.format_message().split())
    if context is None:
        return f"Error: {message}"
    return f"{context.get_usage()}\nTry '{context.command_path} -h' for help.\nError: {message}"


app = typer.Typer(
    name="clipdex",
    cls=OneLineUsageErrors,
    # Help as click writes it: wrapped, never cut. Typer's rich panels cut a word longer than
    # their narrow column ("postgresql+psycopg:/…") and took "[default: ...]" in a help text for markup.
    rich_markup_mode=None,
    help="Search your photos and texts by meaning: a CLIP index on FAISS and SQLite.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def show_version(value: bool) -> None:
    if value:
        from clipdex.cli.version_cmd import version_line

        print(version_line())
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors"),
    version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                 help="Show clipdex's version and exit (`clipdex version`: every part's)"),
) -> None:
    common.DEBUG["enabled"] = debug


def _register() -> None:
    from clipdex.cli import (analysis_cmd, browse_cmd, cache_cmd, evaluate_cmd, explain_cmd, index_cmd, library_cmd,
                             ocr_cmd, scale_cmd, search_cmd, serve_cmd, text_cmd, version_cmd, watch_cmd)

    for module in (index_cmd, text_cmd, search_cmd, browse_cmd, explain_cmd, analysis_cmd, evaluate_cmd, library_cmd,
                   scale_cmd, serve_cmd, cache_cmd, version_cmd, ocr_cmd, watch_cmd):
        module.register(app)


_register()


def main() -> None:
    try:
        app()
    finally:
        common.close_opened()
        # Leave out the interpreter's last garbage collection at exit: after a run that loaded
        # torch and open_clip it walks millions of objects for about a second, only to free
        # memory that the system takes back anyway. The catalogs are closed just above (the
        # collection was what closed those held in reference cycles), files and locks by the
        # commands, and objects still go when their last reference does.
        gc.freeze()


if __name__ == "__main__":
    main()
