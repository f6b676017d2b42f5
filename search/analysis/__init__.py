"""Analysis built on a library: zero-shot tags, near-duplicates, retrieval evaluation.

- `zero_shot`: labels for images from text prompts;
- `duplicates`: pairs of near-identical images;
- `evaluate`: recall of a captioned image set.

Explanations of hits belong here. May import the `Library` facade and everything below it;
nothing below imports this room.
"""
