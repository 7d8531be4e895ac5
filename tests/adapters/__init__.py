"""Tests of the Hugging Face generation backend (batcher.adapters._hf*)."""
