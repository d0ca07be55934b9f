"""``meshlib validate``'s logic: every issue of a set of files, errors and warnings."""

from __future__ import annotations

import os
from collections.abc import Iterable

from .._exceptions import Issue
from ._checks import check_set
from ._load import parse_documents, read_documents

__all__ = ["validate_paths"]


def validate_paths(paths: Iterable[str | os.PathLike[str]], *, as_one_mesh: bool = False) -> list[Issue]:
    """Every issue in the files, in file order.

    By default each file is checked on its own and a clash between two files (the
    same resource, two rules for one host) is a warning, as ``istioctl validate``
    checks files that may be alternatives. ``as_one_mesh=True`` checks them exactly as
    ``Mesh.from_files`` would load them together, where a clash is an error.
    References (a route's subset) are resolved across all the files given.
    """
    docs, issues = read_documents(paths)
    loaded = parse_documents(docs)
    issues.extend(loaded.issues)
    issues.extend(check_set(loaded.resources, cross_file="error" if as_one_mesh else "warning"))
    order = {name: i for i, name in enumerate(dict.fromkeys(i.file for i in issues))}
    return sorted(issues, key=lambda i: (order.get(i.file, 0), i.document if i.document is not None else -1))
