"""The `clipdex` command: parse, call the library, render."""

from __future__ import annotations

import gc

import typer

from clipdex.cli import common

app = typer.Typer(
    name="clipdex",
    help="Search your photos and texts by meaning: a CLIP index on FAISS and SQLite.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
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
    from clipdex.cli import (analysis_cmd, cache_cmd, evaluate_cmd, index_cmd, library_cmd, scale_cmd, search_cmd,
                             serve_cmd, text_cmd, version_cmd)

    for module in (index_cmd, text_cmd, search_cmd, analysis_cmd, evaluate_cmd, library_cmd, scale_cmd, serve_cmd,
                   cache_cmd, version_cmd):
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
