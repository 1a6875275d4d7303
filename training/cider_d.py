"""CIDEr-D of one caption against its references, with document frequencies fixed from a corpus.

The reward of self-critical training (training/scst.py). It computes what pycocoevalcap's Cider
computes (CIDEr-D: tf-idf n-gram vectors for n = 1..4, counts clipped to the reference's, a
Gaussian penalty on the length difference with sigma 6, x10), except that the document frequencies
come from the whole training corpus, given once, instead of from the handful of images scored in
one call: a batch of 16 images is too few for idf to mean anything (Rennie et al. 2017 do the same).
"""

from __future__ import annotations

import math
from collections import Counter

from captioning.tokenizer import standardize

MAX_N = 4
SIGMA = 6.0


def ngram_counts(words: list[str], max_n: int = MAX_N) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


class CiderD:
    def __init__(self, corpus_references: list[list[str]]):
        if not corpus_references:
            raise ValueError("CIDEr-D needs a corpus of reference sets")
        self.document_frequency: Counter = Counter()
        for references in corpus_references:
            seen = set()
            for reference in references:
                seen.update(ngram_counts(standardize(reference).split()))
            self.document_frequency.update(seen)
        self.log_corpus_size = math.log(float(len(corpus_references)))
        self._reference_cache: dict[tuple[str, ...], list] = {}

    def _vector(self, text: str):
        """Per n: {ngram: tf * idf}, the vector's norm, and the caption's length in words."""
        words = standardize(text).split()
        vectors = [dict() for _ in range(MAX_N)]
        norms = [0.0] * MAX_N
        for gram, count in ngram_counts(words).items():
            n = len(gram) - 1
            value = float(count) * (self.log_corpus_size - math.log(max(1.0, self.document_frequency[gram])))
            vectors[n][gram] = value
            norms[n] += value * value
        return vectors, [math.sqrt(x) for x in norms], len(words)

    def _references(self, references: list[str]):
        key = tuple(references)
        cached = self._reference_cache.get(key)
        if cached is None:
            if len(self._reference_cache) > 100_000:
                self._reference_cache.clear()
            cached = self._reference_cache[key] = [self._vector(r) for r in references]
        return cached

    def score(self, candidate: str, references: list[str]) -> float:
        hyp, hyp_norms, hyp_length = self._vector(candidate)
        total = 0.0
        for ref, ref_norms, ref_length in self._references(references):
            penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * SIGMA**2))
            for n in range(MAX_N):
                overlap = sum(
                    min(value, ref[n].get(gram, 0.0)) * ref[n].get(gram, 0.0) for gram, value in hyp[n].items()
                )
                if hyp_norms[n] and ref_norms[n]:
                    total += overlap / (hyp_norms[n] * ref_norms[n]) * penalty
        return 10.0 * total / MAX_N / len(references)
