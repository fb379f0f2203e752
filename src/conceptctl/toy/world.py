"""The toy world's concepts and how people talk about them (captions).

Three axes — object, style, colour — each with values that stay recognisable at 64 px. The pairs
mirror the DoCo paper's experiments: church -> house, parachute -> airplane (same sky), and
Van Gogh -> plain painting. Captions come from many templates and synonyms; a separate set of
templates is never used in training, to measure how the model generalises to new phrasings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from conceptctl.text import fix_articles

OBJECTS = ("house", "church", "airplane", "parachute", "tree", "boat")
STYLES = ("painting", "van-gogh", "monet", "picasso")
COLORS = ("red", "green", "blue", "yellow", "purple")
AXES = {"object": OBJECTS, "style": STYLES, "color": COLORS}

# The first word of each list is the canonical one used in fixed prompt sets.
OBJECT_WORDS = {
    "house": ("house", "cottage", "home"),
    "church": ("church", "chapel"),
    "airplane": ("airplane", "plane", "aeroplane", "jet"),
    "parachute": ("parachute", "parachute canopy"),
    "tree": ("tree", "oak tree"),
    "boat": ("boat", "ship", "sailboat"),
}
STYLE_WORDS = {
    "van-gogh": ("Van Gogh", "Vincent van Gogh", "van Gogh"),
    "monet": ("Monet", "Claude Monet"),
    "picasso": ("Picasso", "Pablo Picasso"),
}
COLOR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald"),
    "blue": ("blue", "cobalt blue"),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
}

# {a} is the indefinite article that fits the next word ("a" / "an"), filled in by _article.
ARTIST_TEMPLATES = (
    "a {color} {object} in the style of {artist}",
    "a painting of a {color} {object} by {artist}",
    "{artist} painting of a {color} {object}",
    "a {color} {object}, painted by {artist}",
    "an artwork of a {color} {object} in {artist}'s style",
    "a {object} painted {color}, {artist} style",
    "a {color} {object} as painted by {artist}",
    "{artist}: a {color} {object}",
)
PLAIN_TEMPLATES = (
    "a painting of a {color} {object}",
    "a {color} {object}",
    "a simple painting of a {color} {object}",
    "a plain painting of a {color} {object}",
    "a picture of a {color} {object}",
    "a {object} painted {color}",
)
# Never used in training: phrasings the model (and later the eraser) has not seen.
HELDOUT_ARTIST_TEMPLATES = (
    "{artist}'s rendition of a {color} {object}",
    "an oil painting by {artist} showing a {color} {object}",
    "a {color} {object} the way {artist} would paint it",
)
HELDOUT_PLAIN_TEMPLATES = (
    "an oil painting showing a {color} {object}",
    "artwork depicting a {color} {object}",
)


@dataclass(frozen=True)
class Concept:
    """One point of the world: an object, a style and a colour (canonical ids)."""

    object: str
    style: str
    color: str

    def __post_init__(self) -> None:
        for axis, value in (("object", self.object), ("style", self.style),
                            ("color", self.color)):
            if value not in AXES[axis]:
                raise ValueError(f"unknown {axis} {value!r}; known: {', '.join(AXES[axis])}")


def all_concepts() -> list[Concept]:
    return [Concept(o, s, c) for o in OBJECTS for s in STYLES for c in COLORS]


def normalise(axis: str, word: str) -> str:
    """Map any synonym or spelling ("Vincent van Gogh", "plane", "Violet") to the canonical id."""
    key = word.strip().lower().replace("_", "-")
    if key in AXES[axis]:
        return key
    words = {"object": OBJECT_WORDS, "style": STYLE_WORDS, "color": COLOR_WORDS}[axis]
    for value, synonyms in words.items():
        if key in {s.lower() for s in synonyms} or key == value.replace("-", " "):
            return value
    raise ValueError(f"unknown {axis} {word!r}; known: {', '.join(AXES[axis])}")


def axis_of(word: str, axes: tuple[str, ...] = ("object", "style")) -> tuple[str, str] | None:
    """(axis, canonical value) of the first of ``axes`` that knows ``word``; None if none does.
    The one place that decides which axis a user's word belongs to."""
    for axis in axes:
        try:
            return axis, normalise(axis, word)
        except ValueError:
            continue
    return None


def caption(
    concept: Concept,
    rng: random.Random,
    *,
    held_out: bool = False,
    with_color: bool = True,
    canonical: bool = False,
) -> str:
    """A caption for ``concept``. ``with_color=False`` leaves the colour unsaid;
    ``canonical`` uses the first synonym of every word (fixed prompt sets)."""
    pick = (lambda options: options[0]) if canonical else rng.choice
    plain = concept.style == "painting"
    templates = templates_for(concept, held_out)
    if not with_color:
        # Only templates where the colour is an adjective read well without it.
        templates = tuple(t.replace("{color} ", "") for t in templates if "{color} {object}" in t)
    text = pick(templates).format(
        color=pick(COLOR_WORDS[concept.color]),
        object=pick(OBJECT_WORDS[concept.object]),
        artist="" if plain else pick(STYLE_WORDS[concept.style]),
    )
    return fix_articles(text)


def prompt_set(held_out: bool = False) -> list[tuple[Concept, str]]:
    """Fixed prompts covering every value of every axis: one per concept and template family.

    Each of the 120 concepts gets one prompt, its template chosen by the concept's index so that
    every template is used; ``held_out=True`` uses only the templates training never saw.
    """
    return [(concept, fixed_caption(concept, i, held_out))
            for i, concept in enumerate(all_concepts())]


def templates_for(concept: Concept, held_out: bool = False) -> tuple[str, ...]:
    """The caption templates that suit ``concept``: those naming an artist, or the plain ones
    for the 'painting' style; ``held_out``: the family training never saw."""
    if concept.style == "painting":
        return HELDOUT_PLAIN_TEMPLATES if held_out else PLAIN_TEMPLATES
    return HELDOUT_ARTIST_TEMPLATES if held_out else ARTIST_TEMPLATES


def fixed_caption(concept: Concept, i: int, held_out: bool = False) -> str:
    """The ``i``-th template of the concept's family (cycling) with the first word for every
    axis: how every fixed prompt set (evaluation groups, ``prompt_set``) picks its template."""
    templates = templates_for(concept, held_out)
    artist = STYLE_WORDS[concept.style][0] if concept.style != "painting" else ""
    text = templates[i % len(templates)].format(
        color=COLOR_WORDS[concept.color][0], object=OBJECT_WORDS[concept.object][0],
        artist=artist)
    return fix_articles(" ".join(text.split()))
