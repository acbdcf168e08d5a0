"""Normalisation key used to group spelling variants of a mention.

``normalization_key(text)`` maps a string to a key such that trivial variants of
one another share it. The split rule (see :mod:`hf_kfac.el.task`) puts a whole
key family into one split, so dev/test never contain a mere re-spelling of a
training string. The rules, applied in this order:

1. Unicode NFKD, then accents (combining marks) are removed: ``säure -> saure``.
2. ``str.casefold`` (``ß -> ss``).
3. Greek letters are spelt out: ``α -> alpha``, ``β -> beta``, ... (µ -> mu).
4. Curly/back-tick apostrophes become ``'``; a possessive ``'s`` is dropped.
5. Every run of characters that are not letters or digits (punctuation, hyphens,
   slashes, brackets, underscores, whitespace) becomes one space; then tokens.
6. Per alphabetic token, UK -> US spelling (``_uk_to_us``):
   * whole words: aluminium->aluminum, grey->gray, mould->mold,
     programme->program;
   * ``ae -> e`` and ``oe -> e`` anywhere (haemorrhage, oedema, foetal);
   * ``our -> or`` when at least two letters precede (tumour, behaviour; not
     four/hour);
   * ``-ise/-yse`` family -> ``-ize/-yze`` at the end of a word of 5+ letters
     (suffixes e, ed, es, ing, ation, ations): organisation, paralysed;
   * ``-tre/-bre`` -> ``-ter/-ber`` at the end (centre, fibre; also +s);
   * ``-ogue -> -og`` (analogue), ``sulph -> sulf``;
   * ``-lled/-lling/-ller(s)`` -> single ``l`` (labelled, signalling).
7. Per alphabetic token of 4+ letters, plural folding (``_singular``): ``-ies ->
   -y`` (5+ letters); otherwise a final ``s`` is dropped unless the word ends in
   ``ss``, ``us`` or ``is``; then a final ``e`` is dropped (not ``ee``) so that
   ``-s`` and ``-es`` plurals agree (viruses/virus, boxes/box, diseases/disease).
8. The stop words ``an, the, of, and`` are removed (not ``a``: it is a
   designator in names such as hepatitis A, vitamin A, cyclophilin A).
9. Tokens are sorted (word order is ignored) and joined by single spaces.

The key is a grouping device, never shown to a model; over-folding only makes
families larger (and may make a few strings ambiguous, which are then dropped).
A string with no letters or digits gets the empty key.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

__all__ = ["normalization_key", "STOPWORDS"]

STOPWORDS: frozenset[str] = frozenset({"an", "the", "of", "and"})

_GREEK = {
    "α": "alpha", "β": "beta", "γ": "gamma", "δ": "delta", "ε": "epsilon",
    "ζ": "zeta", "η": "eta", "θ": "theta", "ι": "iota", "κ": "kappa",
    "λ": "lambda", "μ": "mu", "µ": "mu", "ν": "nu", "ξ": "xi", "ο": "omicron",
    "π": "pi", "ρ": "rho", "σ": "sigma", "ς": "sigma", "τ": "tau",
    "υ": "upsilon", "φ": "phi", "χ": "chi", "ψ": "psi", "ω": "omega",
}
_GREEK_RE = re.compile("|".join(map(re.escape, _GREEK)))
_APOSTROPHES_RE = re.compile("[\u2018\u2019\u201b\u02bc\u00b4`\u2032]")
_POSSESSIVE_RE = re.compile(r"'s\b")
_NON_WORD_RE = re.compile(r"[\W_]+")

_WORD_MAP = {"aluminium": "aluminum", "grey": "gray", "mould": "mold",
             "programme": "program"}
_OUR_RE = re.compile(r"(?<=[a-z]{2})our")
_ISE_RE = re.compile(r"(?<=[a-z]{2})([iy])s(e|ed|es|ing|ation|ations)$")
_TRE_RE = re.compile(r"(?<=[a-z])([tb])re(s?)$")
_OGUE_RE = re.compile(r"(?<=[a-z]{2})ogue(s?)$")
_LL_RE = re.compile(r"(?<=[a-z]{2})ll(ed|ing|er|ers)$")


def _uk_to_us(tok: str) -> str:
    """Fold the documented UK spellings of one lower-case token to US ones."""
    tok = _WORD_MAP.get(tok, tok)
    if "ae" in tok:
        tok = tok.replace("ae", "e")
    if "oe" in tok:
        tok = tok.replace("oe", "e")
    if "our" in tok:
        tok = _OUR_RE.sub("or", tok)
    if len(tok) >= 5 and "s" in tok[-7:]:
        tok = _ISE_RE.sub(r"\1z\2", tok)
    if "re" in tok[-4:]:
        tok = _TRE_RE.sub(r"\1er\2", tok)
    if "ogue" in tok:
        tok = _OGUE_RE.sub(r"og\1", tok)
    if "sulph" in tok:
        tok = tok.replace("sulph", "sulf")
    if "ll" in tok:
        tok = _LL_RE.sub(r"l\1", tok)
    return tok


def _singular(tok: str) -> str:
    """Fold plural -s/-es/-ies and a final -e of one token of 4+ letters."""
    if len(tok) < 4:
        return tok
    if len(tok) >= 5 and tok.endswith("ies"):
        return tok[:-3] + "y"
    if tok.endswith("s") and not tok.endswith(("ss", "us", "is")):
        tok = tok[:-1]
    if len(tok) >= 4 and tok.endswith("e") and not tok.endswith("ee"):
        tok = tok[:-1]
    return tok


@lru_cache(maxsize=1 << 16)
def _fold_token(tok: str) -> str:
    """Spelling and plural folding of one token (rules 6-7); '' for a stop word."""
    if tok.isalpha() and tok.isascii():
        tok = _singular(_uk_to_us(tok))
    return "" if tok in STOPWORDS else tok


@lru_cache(maxsize=1 << 18)
def normalization_key(text: str) -> str:
    """Return the variant-folding key of ``text`` (rules in the module docstring)."""
    s = text.casefold()
    if not s.isascii():
        s = unicodedata.normalize("NFKD", s)
        s = "".join(ch for ch in s if not unicodedata.combining(ch)).casefold()
        s = _GREEK_RE.sub(lambda m: " " + _GREEK[m.group(0)] + " ", s)
        s = _APOSTROPHES_RE.sub("'", s)
    if "'" in s:
        s = _POSSESSIVE_RE.sub("", s)
    tokens = [t for t in map(_fold_token, _NON_WORD_RE.sub(" ", s).split()) if t]
    tokens.sort()
    return " ".join(tokens)
