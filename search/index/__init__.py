"""The vector index: FAISS, kept in step with the catalog.

- `vectors`: the index file and its spec (type, parameters, the generation stamp);
- `choice`: which index type suits a library, building and training it;
- `exact_small`: exact numpy search of a small library, without importing FAISS;
- `store`: the index the library searches, caught up from the catalog's change log;
- `rerank_cache`: float16 copies of the catalog's vectors, that a reranking index reads its
  candidates from (`rerank.f16`), kept by the library's writer;
- `optimize` (and `optimize_cluster`, its build on Ray): tuning an index to a recall target;
- `query_sample` (and `data/`): the queries optimize tunes with;
- `import_vectors`: libraries from precomputed vectors (clip-retrieval output).

May import: the catalog, the encoders' model specs, and the foundation modules. Code
that works on a whole library takes the parts it needs (see `LibraryParts` in
`query_sample`), never the `Library` class itself.
"""
