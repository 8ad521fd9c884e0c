"""Benchmark scoring: VGGSound-Omni tracks, the field's audio metrics and the embedders they run on."""
