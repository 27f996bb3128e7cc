"""TF-IDF similarity of a text to an expert's data, as What the Weight?! scores it (Holtermann et al. 2024,
arXiv:2401.12756; official code CaroHolt/wtw, ``code/run_clm_adapter.py``, ``adapter_weighting == 'tfidf'``):
the expert's document is its sample sequences joined into one text; scikit-learn's ``TfidfVectorizer`` is fitted
on just the two documents ``[expert document, target]`` (raw term counts, smoothed idf
``ln((1 + 2) / (1 + df)) + 1``, L2-normalised rows) and the score is the cosine of the two rows.

Written out here without scikit-learn at scoring time, so an expert's document is reduced once to its term
counts (a library artifact: term hashes and counts, no text). Tokens: the text lower-cased, ASCII punctuation
removed, split on whitespace, English stop words (scikit-learn's list, as the official code) dropped. The
official code also Porter-stems each token (nltk); moerge does not stem (no nltk dependency), and counts each
row's tokens apart (the rows joined by a space; the official code joins them with ``''``, fusing the words at
each boundary): stated deviations."""

from __future__ import annotations

import hashlib
import math
import string
from collections import Counter
from collections.abc import Iterable

import torch

from moerge.errors import RecipeNotApplicableError

KIND = "tfidf_terms"
CONFIG = {"tokens": "lower-nopunct-whitespace", "hash": "sha256-63", "version": 1}
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_IDF_ONE_DOC = math.log(3 / 2) + 1.0  # idf of a term in one of the two documents (in both: ln(3/3) + 1 = 1)


def tokens(text: str) -> list[str]:
    """Lower-cased, punctuation-free, whitespace-split tokens (stop words not yet removed)."""
    return text.lower().translate(_PUNCTUATION).split()


def term_id(token: str) -> int:
    """A stable 63-bit id of a token (so term counts are stored as tensors, without the text)."""
    return int.from_bytes(hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()[:8], "big") >> 1


def term_counts(texts: Iterable[str]) -> dict[str, torch.Tensor]:
    """The artifact of one expert's document (its texts joined): ``{"ids": int64 [V], "counts": float [V]}``."""
    counts = Counter(term_id(t) for text in texts for t in tokens(text))
    ids = sorted(counts)
    return {
        "ids": torch.tensor(ids, dtype=torch.int64),
        "counts": torch.tensor([float(counts[i]) for i in ids], dtype=torch.float64),
    }


def english_stop_ids() -> frozenset[int]:
    """Term ids of scikit-learn's English stop words (what ``stop_words='english'`` removes)."""
    try:
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    except ImportError:
        raise RecipeNotApplicableError(
            "TF-IDF scoring with English stop words removed (as the paper) needs scikit-learn's stop-word list. "
            "Fix: pip install scikit-learn, or pass -o tfidf_stop_words=none"
        ) from None
    return frozenset(term_id(w) for w in ENGLISH_STOP_WORDS)


class TfidfScorer:
    """Cosine of TF-IDF vectors between a text and each expert's document, the idf fitted on each pair."""

    def __init__(self, documents: list[dict[str, torch.Tensor]], stop_ids: frozenset[int] = frozenset()):
        self.stop_ids = stop_ids
        self.docs = []
        for d in documents:
            counts = {
                int(i): float(c)
                for i, c in zip(d["ids"].tolist(), d["counts"].tolist())
                if int(i) not in stop_ids
            }
            self.docs.append((counts, sum(c * c for c in counts.values())))

    def scores(self, texts: list[str]) -> torch.Tensor:
        """``[B, E]`` TF-IDF cosines (0 where either document has no terms)."""
        out = torch.zeros(len(texts), len(self.docs), dtype=torch.float64)
        for b, text in enumerate(texts):
            q = Counter(i for i in map(term_id, tokens(text)) if i not in self.stop_ids)
            q_sq = sum(c * c for c in q.values())
            for e, (doc, doc_sq) in enumerate(self.docs):
                shared = [(c, doc[i]) for i, c in q.items() if i in doc]
                dot = sum(cq * cd for cq, cd in shared)  # idf = 1 for a term in both documents
                # ‖tf·idf‖²: terms of one document alone weigh idf² = _IDF_ONE_DOC², shared ones 1
                q_norm = _IDF_ONE_DOC**2 * q_sq - (_IDF_ONE_DOC**2 - 1) * sum(cq * cq for cq, _ in shared)
                d_norm = _IDF_ONE_DOC**2 * doc_sq - (_IDF_ONE_DOC**2 - 1) * sum(cd * cd for _, cd in shared)
                if dot > 0 and q_norm > 0 and d_norm > 0:
                    out[b, e] = dot / math.sqrt(q_norm * d_norm)
        return out.float()
