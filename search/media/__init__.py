"""Media: files to pixels (and, next, to frames and words) for the indexer and the queries.

- `safe_read`: bounded reads of regular files (no devices, no FIFOs, a size cap);
- `imaging`: decoding, EXIF orientation, HEIC/AVIF, thumbnails, decompression bombs;
- `raw`: RAW photos through rawpy (the embedded preview, or a half-size demosaic);
- `gpu_decode`: batched nvJPEG decoding on a GPU;
- `fileid`: the content hash that identifies a file's bytes.

RAW photos, video frames and OCR belong here. May import only the foundation modules
(errors) and third-party readers.
"""
