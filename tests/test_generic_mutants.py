"""Tests written to kill the generic mutation tool's survivors in aclab/core and the env layer's autoreset
/ truncation code (docs/testing.md); each names the behaviour it pins."""
