"""The built-in procedural corpus (see docs/corpus.md).

Modules, in the order data flows through them: `vocab` (label sets and
words), `world` and `scenes` (scene graphs per split), `shapes` and `render`
(pixels, masks, depth), `captions`, `qa`, `video` and `vtext` (videos and
their text), `samples` (one encoded sample), `writers` (deterministic
shards), `generate` (the whole corpus and its card), `presets` (sizes).
"""
