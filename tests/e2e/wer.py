#!/usr/bin/env python3
"""Word error rate and word accuracy, for scoring speech-to-text output.

Standard library only; import it from other scripts (put tests/e2e on
sys.path) or run it as a command.

API
---
normalize(text) -> list[str]
    Lowercases, turns digits into words ("42" -> "forty two", "3.5" ->
    "three point five", "1,000" -> "one thousand"), splits hyphenated words
    ("twenty-one" -> "twenty one"), drops recognizer markers such as
    "<sil>", "[noise]" and alternate-pronunciation suffixes ("the(2)"), and
    strips punctuation except apostrophes inside words ("don't" stays).

edit_counts(ref_words, hyp_words) -> Counts
    Levenshtein alignment over word lists (substitution, deletion and
    insertion each cost 1). Counts has .substitutions, .deletions,
    .insertions, .ref_words, .hyp_words, .errors, .wer and .accuracy.
    Counts add up with "+" so a corpus is scored as one (errors summed over
    files, divided by the reference words summed over files), which is the
    usual corpus WER, not a mean of per-file rates.

score(ref_text, hyp_text) -> Counts
    normalize() both texts, then edit_counts().

wer(ref_text, hyp_text) -> float
    errors / reference words. 0.0 is perfect; it can exceed 1.0 when the
    hypothesis has many insertions. An empty reference gives 0.0 for an empty
    hypothesis and 1.0 (by convention here) otherwise.

word_accuracy(ref_text, hyp_text) -> float
    1 - wer(). 1.0 is perfect; it can be negative (many insertions): it is
    reported as is, never clamped.

corpus(pairs) -> Counts
    Sum of score(ref, hyp) over an iterable of (ref_text, hyp_text) pairs.

Command line
------------
    wer.py REF_TEXT HYP_TEXT
    wer.py --pairs FILE      # one "ref<TAB>hyp" pair per line ("-" = stdin)
prints one line per pair ("accuracy  ref  ||  hyp") and, last, a JSON line
{"pairs": n, "ref_words": .., "errors": .., "substitutions": ..,
 "deletions": .., "insertions": .., "wer": .., "word_accuracy": ..}.
With --min-accuracy X it exits 1 when the overall accuracy is below X.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from typing import Iterable, List, Sequence, Tuple

__all__ = [
    "Counts",
    "normalize",
    "number_to_words",
    "edit_counts",
    "score",
    "wer",
    "word_accuracy",
    "corpus",
]

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen",
    "sixteen", "seventeen", "eighteen", "nineteen",
]
_TENS = [
    "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy",
    "eighty", "ninety",
]
_SCALES = [
    (10**12, "trillion"), (10**9, "billion"), (10**6, "million"),
    (1000, "thousand"),
]


def number_to_words(n: int) -> List[str]:
    """Cardinal English words for a non-negative integer (US style, no "and")."""
    if n < 0:
        return ["minus"] + number_to_words(-n)
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        tens, ones = divmod(n, 10)
        return [_TENS[tens]] + ([_ONES[ones]] if ones else [])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return [_ONES[hundreds], "hundred"] + (number_to_words(rest) if rest else [])
    for value, name in _SCALES:
        if n >= value:
            high, rest = divmod(n, value)
            return number_to_words(high) + [name] + (number_to_words(rest) if rest else [])
    raise AssertionError("unreachable")  # pragma: no cover


# A number token: digits with optional thousands commas and an optional
# decimal part ("1,000", "3.5", "42").
_NUMBER = re.compile(r"^\d{1,3}(?:,\d{3})+(?:\.\d+)?$|^\d+(?:\.\d+)?$")
# Recognizer markers that are not words: <s>, </s>, <sil>, [noise], ++garbage++.
_MARKER = re.compile(r"<[^>]*>|\[[^\]]*\]|\+\+[^+]*\+\+")
# Alternate pronunciation suffix that some dictionaries leak: "the(2)".
_ALT_PRON = re.compile(r"\(\d+\)")


def _number_words(token: str) -> List[str]:
    whole, _, frac = token.replace(",", "").partition(".")
    words = number_to_words(int(whole))
    if frac:
        words += ["point"] + [_ONES[int(d)] for d in frac]
    return words


def normalize(text: str) -> List[str]:
    """Words of text, normalized for scoring (see the module docstring)."""
    text = _MARKER.sub(" ", text.lower())
    text = _ALT_PRON.sub("", text)
    # Curly apostrophes are the same word as straight ones.
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    words: List[str] = []
    for raw in re.split(r"[\s\-\u2013\u2014/]+", text):
        # Keep digits, commas and dots long enough to read a number.
        token = raw.strip(".,;:!?\"'()")
        if _NUMBER.match(token):
            words.extend(_number_words(token))
            continue
        # Split glued digits from letters ("3pm" -> "3 pm") and read them.
        for piece in re.findall(r"\d+|[^\d]+", token):
            if piece.isdigit():
                words.extend(number_to_words(int(piece)))
                continue
            # Anything but letters, digits and inner apostrophes separates words.
            for word in re.split(r"[^\w']+", piece):
                word = word.strip("'_")
                if word:
                    words.append(word)
    return words


@dataclasses.dataclass(frozen=True)
class Counts:
    """Alignment counts; add them to score a corpus as a whole."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    ref_words: int = 0
    hyp_words: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        if self.ref_words == 0:
            return 0.0 if self.hyp_words == 0 else 1.0
        return self.errors / self.ref_words

    @property
    def accuracy(self) -> float:
        return 1.0 - self.wer

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.ref_words + other.ref_words,
            self.hyp_words + other.hyp_words,
        )

    def as_dict(self) -> dict:
        return {
            "ref_words": self.ref_words,
            "hyp_words": self.hyp_words,
            "errors": self.errors,
            "substitutions": self.substitutions,
            "deletions": self.deletions,
            "insertions": self.insertions,
            "wer": round(self.wer, 4),
            "word_accuracy": round(self.accuracy, 4),
        }


def edit_counts(ref: Sequence[str], hyp: Sequence[str]) -> Counts:
    """Minimum-edit alignment of two word lists, with the kind of each edit.

    Ties between alignments of equal cost are broken in a fixed order
    (match or substitution, then deletion, then insertion): the total error
    count is the minimum either way; only its split into kinds depends on it.
    """
    n, m = len(ref), len(hyp)
    # Each cell holds (cost, substitutions, deletions, insertions).
    prev = [(j, 0, 0, j) for j in range(m + 1)]
    for i in range(1, n + 1):
        cur = [(i, 0, i, 0)]
        for j in range(1, m + 1):
            diag = prev[j - 1]
            if ref[i - 1] == hyp[j - 1]:
                best = diag
            else:
                best = (diag[0] + 1, diag[1] + 1, diag[2], diag[3])
            up = prev[j]
            if up[0] + 1 < best[0]:
                best = (up[0] + 1, up[1], up[2] + 1, up[3])
            left = cur[j - 1]
            if left[0] + 1 < best[0]:
                best = (left[0] + 1, left[1], left[2], left[3] + 1)
            cur.append(best)
        prev = cur
    _, subs, dels, ins = prev[m]
    return Counts(subs, dels, ins, n, m)


def score(ref_text: str, hyp_text: str) -> Counts:
    return edit_counts(normalize(ref_text), normalize(hyp_text))


def wer(ref_text: str, hyp_text: str) -> float:
    return score(ref_text, hyp_text).wer


def word_accuracy(ref_text: str, hyp_text: str) -> float:
    return score(ref_text, hyp_text).accuracy


def corpus(pairs: Iterable[Tuple[str, str]]) -> Counts:
    total = Counts()
    for ref_text, hyp_text in pairs:
        total = total + score(ref_text, hyp_text)
    return total


def _read_pairs(path: str) -> List[Tuple[str, str]]:
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    pairs = []
    with stream:
        for number, line in enumerate(stream, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            ref, sep, hyp = line.partition("\t")
            if not sep:
                raise SystemExit(f"{path}:{number}: expected 'reference<TAB>hypothesis'")
            pairs.append((ref, hyp))
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Word accuracy (1 - WER) of transcripts.")
    parser.add_argument("ref", nargs="?", help="reference text")
    parser.add_argument("hyp", nargs="?", help="hypothesis text")
    parser.add_argument("--pairs", help="file of 'ref<TAB>hyp' lines ('-' for stdin)")
    parser.add_argument("--min-accuracy", type=float, help="exit 1 when overall accuracy is below this")
    args = parser.parse_args(argv)
    if args.pairs is not None:
        if args.ref is not None:
            parser.error("give either --pairs or REF HYP, not both")
        pairs = _read_pairs(args.pairs)
    elif args.ref is not None and args.hyp is not None:
        pairs = [(args.ref, args.hyp)]
    else:
        parser.error("give REF HYP or --pairs FILE")
    total = Counts()
    for ref, hyp in pairs:
        counts = score(ref, hyp)
        total = total + counts
        print(f"{counts.accuracy:6.3f}  {ref}  ||  {hyp}")
    summary = {"pairs": len(pairs), **total.as_dict()}
    print(json.dumps(summary))
    if args.min_accuracy is not None and total.accuracy < args.min_accuracy:
        print(
            f"word accuracy {total.accuracy:.4f} is below {args.min_accuracy}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
