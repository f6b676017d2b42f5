"""What the text and image tower exports share: exporting a tower and saving onnxruntime's
optimized graph, moving a finished export into the library, and remembering a refusal."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

from clipdex.search.atomic import write_json_atomic
from clipdex.search.encoders.model import ResolvedModel
from clipdex.search.readonly import environment_error, environment_reason

logger = logging.getLogger(__name__)
T = TypeVar("T")

# One export at a time in a process: torch's exporter keeps global state (`GLOBALS.in_onnx_export`),
# and a second export begun during another fails inside it. Exporters take it around their check
# for an installed export and the export, so that the second finds the first's export installed.
EXPORT_LOCK = threading.RLock()

# A tower whose module holds at most this many bytes of weights is exported in memory;
# a larger one (protobuf's 2 GiB limit on one message) through a file.
IN_MEMORY_BYTES = 1 << 30


def export_optimized(module: Any, sample: Any, scratch: Path, target: Path, weights_file: str, **export_options: Any) -> None:
    """`torch.onnx.export` of `module` traced on `sample` (`export_options`: names, axes,
    opset), saved as onnxruntime's optimized graph in `target`, weights in `weights_file` beside it.

    The raw graph goes to onnxruntime as bytes, never written and read back (a second or so
    for ViT-B-32's image tower), unless the module is too large for that: then through a
    folder in `scratch`, removed afterwards with whatever torch wrote beside it.
    """
    import torch

    weights = sum(tensor.numel() * tensor.element_size() for tensor in [*module.parameters(), *module.buffers()])
    raw_folder = scratch / "raw"
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel has no ONNX form
    try:
        if weights <= IN_MEMORY_BYTES:
            import io

            buffer = io.BytesIO()
            _export(module, sample, buffer, export_options)
            source: Path | bytes = buffer.getvalue()
            del buffer
        else:
            raw_folder.mkdir()
            source = raw_folder / "raw.onnx"
            _export(module, sample, str(source), export_options)
        optimize_graph(source, target, weights_file)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        shutil.rmtree(raw_folder, ignore_errors=True)


def _export(module: Any, sample: Any, destination: Any, options: dict[str, Any]) -> None:
    import torch

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (sample,), destination, dynamo=False, do_constant_folding=True, **options)


def optimize_graph(source: Path | bytes, target: Path, weights_file: str) -> None:
    """Save onnxruntime's optimized graph of `source` (a file, or a graph's bytes), weights in
    a side file, so loading it skips that work."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights_file)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    onnxruntime.InferenceSession(source if isinstance(source, bytes) else str(source), options, providers=["CPUExecutionProvider"])


# An export's scratch folder older than this was left by an exporter that was killed before
# it could remove it (no export takes a day); a younger one may be a concurrent exporter's.
STALE_SCRATCH_SECONDS = 24 * 3600


def scratch_folder(library_path: Path, prefix: str) -> Path:
    """A new scratch folder for an export in `library_path` (`prefix` + random), readable by the
    library's readers; stale ones of earlier, killed exports (STALE_SCRATCH_SECONDS) go first."""
    import tempfile

    now = time.time()
    for old in library_path.glob(f"{prefix}*"):
        try:
            if old.is_dir() and not old.is_symlink() and now - old.stat().st_mtime > STALE_SCRATCH_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=library_path))
    os.chmod(scratch, 0o755)  # mkdtemp makes it private; readers of the library need it
    return scratch


def install_export(scratch: Path, target: Path, settings_file: str) -> None:
    """Move the finished export into place; a concurrent exporter that got there first wins."""
    try:
        os.rename(scratch, target)
    except OSError:
        if not (target / settings_file).exists():
            raise


def recorded_refusal(refusal_file: Path, version: int, model: ResolvedModel) -> str | None:
    """Why an earlier export of `model` (by exporter `version`) was refused, as `refusal_file` records, or None."""
    try:
        data = json.loads(refusal_file.read_text())
        if data["version"] == version and ResolvedModel.from_json(data["model"]).same_model(model):
            return None if environment_reason(str(data["reason"])) else str(data["reason"])  # such refusals were recorded by mistake
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def export_or_refuse(what: str, export: Callable[[], T], refused: type[Exception], refusal_file: Path, version: int,
                     model: ResolvedModel, refusal_level: int = logging.WARNING,
                     installed: Callable[[], bool] | None = None) -> T | None:
    """`export()`, never failing the caller: a refusal (`refused`, or an error of the exporter) is
    recorded in `refusal_file` and not retried; an error of the environment (a read-only library,
    a full disk: ENOSPC/EROFS/EACCES anywhere in the export) leaves things as they were, to be retried.
    Nor is a failure a refusal when `installed()` says that the export is there after all (made
    meanwhile by another exporter, whose work the failure may have come from)."""
    library_path = refusal_file.parent
    try:
        return export()
    except Exception as error:  # a refusal, or a model the exporter cannot handle: remember, never fail the caller
        if isinstance(error, OSError) or environment_error(error):
            logger.info("the %s of %s was not exported (%s); the next run tries again", what, library_path, error)
            return None
        if installed is not None and installed():
            logger.info("the %s of %s was exported by another exporter meanwhile (this one met %s: %s)",
                        what, library_path, type(error).__name__, error)
            return None
        reason = str(error) if isinstance(error, refused) else f"{type(error).__name__}: {error}"
        logger.log(refusal_level, "the %s of %s was not exported, and will not be again: %s", what, library_path, reason)
        refusal = {"version": version, "model": model.to_json(), "reason": reason[:500], "at": time.time()}
        try:
            write_json_atomic(refusal_file, refusal)
        except OSError as failure:  # a read-only library: the next process tries again
            logger.info("the refusal of %s's %s export was not recorded (%s)", library_path, what, failure)
    return None
