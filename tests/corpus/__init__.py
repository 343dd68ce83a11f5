"""Bad inputs for tests/test_corpus.py (see README.md)."""
