"""`clipdex version` and `clipdex --version`: what this installation runs on, for a bug report.

Nothing heavy is imported, so the command answers at once: versions come from the installed
distributions' metadata, the CUDA version torch was built for from its `torch/version.py`
(read, not run), and the GPU from the NVIDIA driver's files in /proc (what `--device auto`
also looks at first: `clipdex.search.encoders.factory.gpu_likely`). The standard library's
modules are imported when the command runs: every other command registers it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from clipdex.cli.common import JsonOption, out, print_json

# each component: the distributions that may provide it (the first one installed wins)
DISTRIBUTIONS = {
    "clipdex": ("clipdex",),
    "open_clip": ("open_clip_torch",),
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
}
NVIDIA_PROC = Path("/proc/driver/nvidia")


def register(app: typer.Typer) -> None:
    app.command("version")(version)


def version(json_output: bool = JsonOption) -> None:
    """Show the versions of clipdex, open_clip, torch, onnxruntime, FAISS, SQLite and Python, and the GPU seen."""
    report = versions()
    if json_output:
        print_json(report)
        return
    for name, value in described(report):
        out.print(f"{name:<12} {value}", markup=False, highlight=False)


def described(report: dict[str, Any]) -> list[tuple[str, str]]:
    """`versions()` as lines for a person."""
    shown = {name: report[name] or "not installed" for name in DISTRIBUTIONS}
    if report["torch_cuda"]:
        shown["torch"] += f" (built for CUDA {report['torch_cuda']})"
    gpu = report["gpu"]
    seen = f"{', '.join(gpu['devices']) or 'a GPU'} (NVIDIA driver {gpu['driver'] or 'unknown'})"
    python = f"{report['python']} ({report['python_implementation']})"
    return [*shown.items(), ("sqlite", report["sqlite"]), ("python", python), ("platform", report["platform"]),
            ("gpu", seen if gpu["seen"] else "none seen (no NVIDIA driver)")]


def version_line() -> str:
    return f"clipdex {installed_version('clipdex') or 'unknown'}"


def versions() -> dict[str, Any]:
    """The versions of the parts (None: not installed) and what GPU the driver reports."""
    import importlib.util
    import platform
    import sqlite3

    report: dict[str, Any] = {name: installed_version(*names) for name, names in DISTRIBUTIONS.items()}
    if report["faiss"] is None and importlib.util.find_spec("faiss") is not None:  # a build without package metadata
        import faiss

        report["faiss"] = getattr(faiss, "__version__", "unknown")
    report["torch_cuda"] = torch_build_setting("cuda") if report["torch"] else None
    report["sqlite"] = sqlite3.sqlite_version
    report["python"] = platform.python_version()
    report["python_implementation"] = platform.python_implementation()
    report["platform"] = platform.platform()
    report["gpu"] = nvidia_gpus()
    return report


def installed_version(*distributions: str) -> Optional[str]:
    import importlib.metadata

    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def torch_build_setting(name: str) -> Optional[str]:
    """A constant of `torch/version.py` (`cuda`: the CUDA version torch was built for, None on
    a CPU build), read without importing torch, which takes seconds."""
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        for location in locations:
            for node in ast.parse((Path(location) / "version.py").read_text()).body:
                if isinstance(node, ast.Assign):
                    targets, value = node.targets, node.value
                elif isinstance(node, ast.AnnAssign) and node.value is not None:
                    targets, value = [node.target], node.value
                else:
                    continue
                if any(isinstance(target, ast.Name) and target.id == name for target in targets):
                    constant = ast.literal_eval(value)
                    return None if constant is None else str(constant)
    except (ImportError, OSError, SyntaxError, ValueError):
        pass
    return None


def nvidia_gpus(root: Path | None = None) -> dict[str, Any]:
    """What the NVIDIA driver reports: its version and the GPUs' names (none without the driver)."""
    root = root or NVIDIA_PROC
    driver: Optional[str] = None
    try:
        first = (root / "version").read_text().splitlines()[0]  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  ..."
        driver = next((word for word in first.split() if word[:1].isdigit() and "." in word), first.strip())
    except (OSError, IndexError):
        pass
    devices: list[str] = []
    try:
        for information in sorted((root / "gpus").glob("*/information")):
            fields = dict(line.split(":", 1) for line in information.read_text().splitlines() if ":" in line)
            devices.append(fields.get("Model", "a GPU").strip())
    except OSError:
        pass
    return {"seen": driver is not None or bool(devices), "driver": driver, "devices": devices}
