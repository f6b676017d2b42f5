"""Media: files to pixels (and, next, to frames and words) for the indexer and the queries.

- `safe_read`: bounded reads of regular files (no devices, no FIFOs, a size cap);
- `imaging`: decoding, EXIF orientation, HEIC/AVIF, thumbnails, decompression bombs;
- `raw`: RAW photos through rawpy (the embedded preview, or a half-size demosaic);
- `video`: videos through PyAV: the moments worth embedding (keyframes, scene changes, blank frames skipped);
- `gpu_decode`: batched nvJPEG decoding on a GPU;
- `fileid`: the content hash that identifies a file's bytes.

OCR belongs here too. May import only the foundation modules
(errors) and third-party readers.
"""
