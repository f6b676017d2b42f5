"""clipdex indexer: turns files into catalog rows and vectors."""

from clipdex.indexer.pipeline import index_paths
from clipdex.indexer.progress import IndexProgress
from clipdex.indexer.report import Failure, IndexReport

__all__ = ["Failure", "IndexProgress", "IndexReport", "index_paths"]
