"""Analysis built on a library: zero-shot tags, near-duplicates, retrieval evaluation.

- `zero_shot`: labels for images from text prompts;
- `duplicates`: pairs of near-identical images;
- `evaluate`: recall of a captioned image set;
- `explain`: the pointing game, how well explanations (`clipdex.search.explanation`) point.

May import the `Library` facade and everything below it;
nothing below imports this room.
"""
