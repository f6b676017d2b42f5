"""The model: specs, preprocessing, tokenizer, runtimes and the verified ONNX exports.

- `model`: model specs and their resolution (no torch or open_clip import);
- `preprocess`, `clip_tokenizer`: open_clip's preprocessing and tokenizer, ported to numpy;
- `base`: the small interface every encoder has; `factory`: picking and loading encoders
  for a library (`LibraryEncoders`, `create_encoder`);
- `torch_clip`: open_clip on torch; `onnx_image`, `onnx_text`: the exported towers on onnxruntime;
- `image_export`, `text_export`, `text_towers`, `onnx_files`: exporting and verifying the towers;
  `export_process`: the export in a process of its own; `export_cache`: this machine's cache of
  verified exports, which a new library of a model exported before starts from;
  `checkpoint_hashes`: checkpoints' sha256, remembered per machine;
- `weights`: whether a model's weights can be had (the hub probed once), before a run loads it;
  `open_clip_logs`: open_clip's root-logger records moved under clipdex's own logger.

Importing this package imports nothing else: torch, open_clip and onnxruntime load only when
an encoder is made. May import the media readers and the foundation modules.
"""
