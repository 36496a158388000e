"""Sphinx hooks of the minisparse book (loaded by book/_config.yml, `sphinx: local_extensions`).

- Launch buttons (Colab) only on the chapters: a page that is executed at build time, such as the Performance
  appendix, is a MyST notebook too, and sphinx-book-theme would offer to open it in Colab.
- The Performance and Roofline pages depend on bench/results/*.json: a new result re-draws their figures on the
  next build, even when the page's text did not change.
"""
from __future__ import annotations

import pathlib

LAUNCHABLE = "chapters/"          # docnames under this prefix keep their launch buttons
RESULTS_PAGES = {"book/performance": "bench/results/*.json", "book/roofline": "bench/results/*.json"}


def _drop_launch_buttons(app, pagename, templatename, context, doctree):
    if pagename.startswith(LAUNCHABLE) or "header_buttons" not in context:
        return
    context["header_buttons"] = [b for b in context["header_buttons"] if b.get("label") != "launch-buttons"]


def _note_results(app, docname, source):
    pattern = RESULTS_PAGES.get(docname)
    if pattern:
        for path in sorted(pathlib.Path(app.srcdir).glob(pattern)):
            app.env.note_dependency(str(path))


def setup(app):
    app.connect("html-page-context", _drop_launch_buttons, priority=900)  # after the theme adds them (501)
    app.connect("source-read", _note_results)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
