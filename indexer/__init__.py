"""clipdex indexer: turns files into catalog rows and vectors."""

from clipdex.indexer.pipeline import index_paths
from clipdex.indexer.progress import IndexProgress
from clipdex.indexer.report import Failure, IndexReport
from clipdex.indexer.watch import WatchBatch, Watcher, WatchOptions, WatchStatus, watch_paths

__all__ = ["Failure", "IndexProgress", "IndexReport", "WatchBatch", "WatchOptions", "WatchStatus", "Watcher", "index_paths",
           "watch_paths"]
