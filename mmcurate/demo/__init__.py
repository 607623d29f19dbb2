"""The built-in synthetic corpus, used by `mmcurate demo` and by tests."""

from mmcurate.demo.corpus import generate_corpus, make_pairs

__all__ = ["generate_corpus", "make_pairs"]
