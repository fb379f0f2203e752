"""Small text helpers shared by prompt builders (anchor templates, suites, the toy world)."""

from __future__ import annotations

import re


def fix_articles(text: str) -> str:
    """'a airplane' -> 'an airplane', 'an church' -> 'a church': the article before every word,
    after a word swap or a template fill (capital A kept)."""
    words = text.split(" ")
    for i, word in enumerate(words[:-1]):
        if word.lower() in ("a", "an"):
            vowel = words[i + 1][:1].lower() in "aeiou"
            words[i] = ("An" if word[0] == "A" else "an") if vowel else (
                "A" if word[0] == "A" else "a")
    return " ".join(words)


def swap_word(prompt: str, words: list[str]) -> list[str]:
    """``prompt`` with each of ``words`` in place of the longest of them it contains (any case);
    [] when it contains none. User text never meets regex syntax unescaped."""
    used = next((w for w in sorted(words, key=len, reverse=True)
                 if re.search(re.escape(w), prompt, re.IGNORECASE)), None)
    if used is None:
        return []
    return [re.sub(re.escape(used), lambda _, w=word: w, prompt, flags=re.IGNORECASE)
            for word in words]
