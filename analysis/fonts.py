"""Fonts for tokens of any script in matplotlib figures, with an escaped fallback instead of tofu boxes.

BLOOM's vocabulary covers dozens of scripts; DejaVu Sans (matplotlib's default) has Latin, Greek, Cyrillic,
Arabic and Hebrew but no CJK or Indic glyphs. ``FontSet`` finds the installed fonts (DejaVu, and the Noto families
when Debian's ``fonts-noto-core`` / ``fonts-noto-cjk`` are installed), knows which code points each one has, and
for every label gives the short list of families that covers it. Characters no installed font has are shown as
``[Script×n]`` (e.g. ``[Kannada×6]``), so a figure never shows a box where a glyph is missing.

matplotlib 3.11+ lays text out with libraqm (HarfBuzz shaping and bidi), so Arabic joins and reads right to left
and Indic vowel signs attach. Older releases draw glyphs one by one, left to right: there, runs of right-to-left
text are reversed into visual order here (letters stay in isolated forms). The HTML report repeats every token as
text, which the browser shapes in any case.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

BASE_FAMILY = "DejaVu Sans"
# Families tried after DejaVu, in order; any other installed "Noto Sans <Script>" family comes after these.
PREFERRED = ("Noto Sans", "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK KR", "Noto Sans CJK TC",
             "Noto Sans Devanagari", "Noto Sans Arabic", "Noto Sans Hebrew", "Noto Sans Thai", "Noto Sans Symbols",
             "Noto Sans Symbols2", "Noto Sans Math", "Droid Sans Fallback")


@dataclass
class FontSet:
    """Installed families (base first) and the code points each has."""

    families: list[str]
    coverage: dict[str, frozenset[int]] = field(repr=False)

    def family_of(self, ch: str) -> str | None:
        """The first family (base first) that has a glyph for ``ch``, None when none has."""
        for fam in self.families:
            if ord(ch) in self.coverage[fam]:
                return fam
        return None

    def missing(self, text: str) -> list[str]:
        """Characters of ``text`` that no installed font has."""
        return [c for c in text if not unicodedata.combining(c) and self.family_of(c) is None
                and unicodedata.category(c)[0] != "C"]

    def prepare(self, text: str) -> tuple[str, list[str]]:
        """(label, families) to draw ``text`` with. A run of characters no installed font has becomes
        ``[Script×n]`` (e.g. ``[Kannada×6]``): readable, never a tofu box. Where matplotlib does no bidi layout,
        right-to-left runs are put in visual order; ``families`` is the base family plus those the label needs."""
        out: list[str] = []
        missing: list[str] = []

        def flush():
            if missing:
                out.append(f"[{script_of(missing[0])}×{len(missing)}]")
                missing.clear()

        for ch in text:
            if self.family_of(ch) is not None:
                flush()
                out.append(ch)
            elif unicodedata.combining(ch):  # a mark no font has belongs to the missing run before it
                if missing:
                    missing.append(ch)
            else:
                if missing and script_of(missing[0]) != script_of(ch):
                    flush()
                missing.append(ch)
        flush()
        label = "".join(out) if _shapes_text() else visual_order("".join(out))
        needed = [self.families[0]]
        for ch in label:
            fam = self.family_of(ch)
            if fam is not None and fam not in needed:
                needed.append(fam)
        return label, needed


def script_of(ch: str) -> str:
    """The script of a character from its Unicode name's first word: "Kannada", "Cjk", "Hangul", "Thai"...;
    "U+XXXX" for a character without a name."""
    name = unicodedata.name(ch, "")
    if not name:
        return f"U+{ord(ch):04X}"
    word = name.split()[0]
    return "CJK" if word == "CJK" else word.title()


@lru_cache(maxsize=1)
def _shapes_text() -> bool:
    """Whether this matplotlib shapes text and applies bidi itself (libraqm layout, matplotlib 3.11+)."""
    from matplotlib import ft2font

    return hasattr(ft2font.FT2Font, "_layout")


def _is_rtl(ch: str) -> bool:
    return unicodedata.bidirectional(ch) in ("R", "AL")


def visual_order(text: str) -> str:
    """Reverse every run of right-to-left characters (keeping combining marks after their base), so a renderer
    that lays glyphs out left to right shows them in reading order. Left-to-right text is unchanged."""
    clusters: list[str] = []
    for ch in text:
        if clusters and unicodedata.combining(ch):
            clusters[-1] += ch
        else:
            clusters.append(ch)
    out, run = [], []
    for cl in clusters:
        if _is_rtl(cl[0]) or (run and unicodedata.bidirectional(cl[0]) in ("WS", "CS", "ON", "AN", "NSM")
                              and not cl[0].isascii()):
            run.append(cl)
        else:
            out += reversed(run)
            run = []
            out.append(cl)
    out += reversed(run)
    return "".join(out)


def _cmap(path: str) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    try:
        font = TTFont(path, fontNumber=0, lazy=True)
        return frozenset(font.getBestCmap() or {})
    except Exception:  # an unreadable font file is simply not used
        return frozenset()


@lru_cache(maxsize=1)
def font_set() -> FontSet:
    """The installed fonts (found once per process). Fonts installed after matplotlib cached its font list are
    registered too, so a fresh ``apt-get install fonts-noto-cjk`` is used without clearing any cache."""
    from matplotlib import font_manager as fm

    known = {f.fname for f in fm.fontManager.ttflist}
    for path in fm.findSystemFonts():
        if path not in known and "noto" in path.lower():
            try:
                fm.fontManager.addfont(path)
            except Exception:
                pass
    regular: dict[str, str] = {}
    for f in fm.fontManager.ttflist:
        if f.style != "normal" or f.weight not in (400, "normal", "regular"):
            continue
        if f.name == BASE_FAMILY or f.name in PREFERRED or f.name.startswith("Noto Sans"):
            if "Mono" in f.name or "Display" in f.name:
                continue
            regular.setdefault(f.name, f.fname)
    names = [BASE_FAMILY] + [n for n in PREFERRED if n in regular] + \
        sorted(n for n in regular if n != BASE_FAMILY and n not in PREFERRED)
    names = [n for n in names if n in regular]
    if not names:  # no DejaVu either (unusual): matplotlib's default family, ASCII only
        return FontSet(["sans-serif"], {"sans-serif": frozenset(range(32, 127))})
    return FontSet(names, {n: _cmap(regular[n]) for n in names})
