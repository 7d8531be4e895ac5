"""Tests of the Hugging Face generation backend (batcher.adapters.hf._backend*)."""
