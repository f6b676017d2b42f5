"""What the text and image tower exports share: saving onnxruntime's optimized graph, and
moving a finished export into the library."""

from __future__ import annotations

import os
from pathlib import Path


def optimize_graph(source: Path, target: Path, weights_file: str) -> None:
    """Save onnxruntime's optimized graph, weights in a side file, so loading it skips that work."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights_file)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def install_export(scratch: Path, target: Path, settings_file: str) -> None:
    """Move the finished export into place; a concurrent exporter that got there first wins."""
    try:
        os.rename(scratch, target)
    except OSError:
        if not (target / settings_file).exists():
            raise
