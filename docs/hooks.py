"""MkDocs hooks: README.md and BENCHMARKS.md, which live at the repository
root, become pages of the site under ``repository/``, so the pages' links to
them (``../README.md#…``, written to work when browsing the repository)
resolve in the built site too, and their anchors are checked."""
from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT_PAGES = ("README.md", "BENCHMARKS.md")
SITE_FOLDER = "repository"
_ROOT_LINK = re.compile(r"\]\(\.\./(" + "|".join(re.escape(n) for n in ROOT_PAGES) + r")")


def on_files(files, config):
    root = Path(config.config_file_path).resolve().parent
    for name in ROOT_PAGES:
        files.append(File.generated(config, f"{SITE_FOLDER}/{name}", abs_src_path=str(root / name)))
    return files


_LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?:\./)?(?P<target>[^)\s]+)\)")
_KEEP = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|#|/)|^(?:" + "|".join(re.escape(n) for n in ROOT_PAGES) + r")(?:#|$)")


def _repository_link(m: re.Match) -> str:
    """A link of README.md or BENCHMARKS.md as seen from ``repository/``:
    into docs/ it goes up to the site's root; to the other root page it
    stays; to any other file of the repository (a script, the licence), not
    part of the site, it becomes its text."""
    target = m["target"]
    if target.startswith("docs/"):
        return f"{m['bang']}[{m['text']}](../{target[len('docs/'):]})"
    if _KEEP.match(target):
        return m[0]
    return m["text"]


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri.startswith(f"{SITE_FOLDER}/"):
        # the repository's pages point at docs/ from the root; here docs/ is the site's root
        return _LINK.sub(_repository_link, markdown.replace('src="docs/', 'src="../'))
    return _ROOT_LINK.sub(rf"]({SITE_FOLDER}/\1", markdown)


# Docstrings are written with Sphinx roles (:func:`name`, :class:`~.mod.Name`);
# mkdocstrings renders the backquoted part as code and leaves the role's name.
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):<code>~?\.?")


def on_page_content(html, page, config, files):
    return _ROLE.sub("<code>", html)
