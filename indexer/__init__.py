"""clipdex indexer: turns files into catalog rows and vectors."""

from clipdex.indexer.pipeline import Failure, IndexReport, index_paths

__all__ = ["Failure", "IndexReport", "index_paths"]
