"""`clipdex cache info` and `clipdex cache clear`: this machine's cache of verified model exports."""

from __future__ import annotations

import time

import typer

from clipdex.cli.common import JsonOption, handles_errors, out, print_json


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="This machine's cache of verified ONNX exports: a new library of a model exported "
                             "here before starts without exporting it", no_args_is_help=True)
    group.command("info")(info)
    group.command("clear")(clear)
    app.add_typer(group, name="cache")


@handles_errors
def info(json_output: bool = JsonOption) -> None:
    """Where the export cache is, its size and cap, and each cached export (most recently used first)."""
    from clipdex.search.encoders.export_cache import SIZE_ENV, ExportCache

    cache = ExportCache.default()
    entries = list(reversed(cache.entries()))
    total = sum(entry.bytes for entry in entries)
    if json_output:
        print_json({"path": str(cache.folder), "enabled": cache.enabled, "max_bytes": cache.max_bytes, "bytes": total,
                    "entries": [entry.to_json() for entry in entries]})
        return
    cap = f"at most {_mib(cache.max_bytes)}" if cache.enabled else f"off (${SIZE_ENV}=0)"
    out.print(f"export cache {cache.folder}: {len(entries)} entries, {_mib(total)} ({cap})", markup=False)
    for entry in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        out.print(f"  {entry.tower or 'damaged':<7} {_mib(entry.bytes):>10}  used {used}  {entry.model or entry.path}",
                  markup=False)


@handles_errors
def clear(json_output: bool = JsonOption) -> None:
    """Remove every cached export; libraries keep their own (the next new library of a model exports it again)."""
    from clipdex.search.encoders.export_cache import ExportCache

    cache = ExportCache.default()
    removed = cache.clear()
    total = sum(entry.bytes for entry in removed)
    if json_output:
        print_json({"path": str(cache.folder), "removed": len(removed), "bytes": total})
        return
    out.print(f"removed {len(removed)} cached exports ({_mib(total)}) from {cache.folder}", markup=False)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
