"""Data validation with Great Expectations 1.x: per-sample features, suites,
per-row failure reasons, quarantine and the clean copy of a corpus.

- `features`: one DataFrame row per sample (decoding errors are row values);
- `suites`: the GX expectation suites (image, video, captions), each
  expectation tagged with the quarantine reason it stands for;
- `gx_run`: runs the suites in a file context, turns COMPLETE results into
  per-row reasons and builds the Data Docs site;
- `clean`: the report, the quarantine list and the re-sharded clean copy.

The stage that wires them together is `peflow.stages.validate`.
"""
