"""SCAFFOLD: tracing, blocks and drawing; to be replaced by the real implementation."""
