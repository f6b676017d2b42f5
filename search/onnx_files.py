"""What the text and image tower exports share: exporting a tower and saving onnxruntime's
optimized graph, and moving a finished export into the library."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

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


def install_export(scratch: Path, target: Path, settings_file: str) -> None:
    """Move the finished export into place; a concurrent exporter that got there first wins."""
    try:
        os.rename(scratch, target)
    except OSError:
        if not (target / settings_file).exists():
            raise
