"""The catalog: the library's source of truth, and every SQL statement clipdex runs.

Owns the items, their metadata and vectors, the change log and the query cache, on
SQLite (the default) or PostgreSQL (a shared catalog):

- `database`: the catalog on SQLAlchemy, for SQLite and PostgreSQL, with its migrations;
- `local`: a library's own SQLite catalog on the sqlite3 module (the everyday commands'
  path, without importing SQLAlchemy), kept equal to `database` by the tests;
- `types`: what both hand out and take (rows, batches, database errors, IN-list chunks);
- `vector_rows`: vectors as stored in rows, and back.

May import: the foundation modules at the top of `clipdex.search` (errors, locks,
readonly) and the query types (`clipdex.search.query`). Never the index, the encoders,
the media readers or the `Library`.
"""
