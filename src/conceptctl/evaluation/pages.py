"""The evaluation's HTML pages (``report.html``, ``compare.html``), rendered from the Jinja2
templates in ``conceptctl/evaluation/templates`` with autoescaping on.

Every string a user or a plugin supplied (concepts, anchors, prompts, metric, group and attack
names, notes, verdicts) reaches a page only through a template, so the engine escapes each one;
nothing is escaped, or forgotten, by hand. The callers hand the templates plain values: numbers
already formatted, chart coordinates already computed.
"""

from __future__ import annotations

from functools import cache


@cache
def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("conceptctl.evaluation", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,  # a misspelt field fails instead of printing nothing
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )


def render_page(template: str, **values) -> str:
    """``template`` (a file of conceptctl/evaluation/templates) filled with ``values``."""
    return _environment().get_template(template).render(**values)
