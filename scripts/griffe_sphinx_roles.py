"""A griffe extension for the docs site (mkdocs.yml): Sphinx roles in docstrings become code.

meshlib's docstrings name other objects the Sphinx way (:meth:`close`,
:class:`~meshlib.PolicyError`); mkdocstrings renders Markdown, where the role would
show as typed. This turns each into inline code with the name Sphinx would show
(the last component after a ``~``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:meth|class|func|attr|mod|exc|data|obj|const):`(~?)\.?([^`]+)`")


def plain(text: str) -> str:
    def code(match: re.Match[str]) -> str:
        tilde, target = match.groups()
        return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"

    return ROLE.sub(code, text)


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
