"""report.html and compare.html come from autoescaped templates: a concept, an artifact folder
and a plugin's metric name holding markup are shown as text in both pages, never run."""

import html

from markupsafe import escape

from conceptctl.backbones.loading import open_backbone
from conceptctl.components import Component
from conceptctl.evaluation.metrics import Score
from conceptctl.hookspecs import hookimpl
from conceptctl.plugins import register_plugin, unregister_plugin
from conceptctl.testing import write_test_artifact

CONCEPT = "<script>alert('concept')</script>"
METRIC = "<script>alert('metric')</script>"
NOTE = "<img src=x onerror=alert('note')>"
PROMPT = "a photo of a <script>alert('prompt')</script>"


class Markup:
    def compute(self, run):
        return [Score(METRIC, "target", 0.5, "higher", images=1, note=NOTE)]


class Plugin:
    @hookimpl
    def register_metrics(self, register):
        register(Component("markup", Markup, "test metric with markup in its name"))


def test_report_and_compare_pages_escape_user_and_plugin_text(cli, tiny_sd1, tmp_path):
    model = open_backbone(str(tiny_sd1), device="cpu")
    # Artifact folders named with markup: compare.html shows them as column headers.
    arts = [write_test_artifact(model, tmp_path / f"<script>{name}", concept=CONCEPT,
                                anchor="house", seed=seed)
            for seed, name in enumerate(("a", "b"))]
    prompts = tmp_path / "prompts.csv"  # two cases keep it short; a prompt with markup too
    prompts.write_text(f'prompt,evaluation_seed,case_number,group\n"{PROMPT}",1,0,target\n'
                       "a photo of a house,2,1,anchor\n")
    register_plugin(Plugin(), "markup-plugin")
    try:
        out = tmp_path / "cmp"
        result = cli("eval", *arts, "--compare", "--prompts", prompts, "--metrics", "markup",
                     "--attacks", "none", "--steps", "2", "-n", "1", "-o", out)
    finally:
        unregister_plugin("markup-plugin")
    assert result.code == 0, result.err
    report = (out / "<script>a" / "report.html").read_text()
    compare = (out / "compare.html").read_text()
    for page, shown in ((report, (CONCEPT, METRIC, NOTE, PROMPT)),
                        (compare, (METRIC, "<script>a"))):
        assert "<script" not in page and "<img src=x" not in page
        text = html.unescape(page)
        for value in shown:
            assert value in text  # shown as written
            assert str(escape(value)) in page  # as text, escaped
    assert "href='%3Cscript%3Ea/report.html'" in compare  # links stay links to the folder
