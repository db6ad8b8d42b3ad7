"""A griffe extension for the docs build (mkdocs.yml): reads the docstrings' ``Example:`` sections as Google-style
``Examples:``, so their ``>>>`` lines render as code.

griffe takes the singular ``Example:`` for an admonition of plain Markdown, where ``ds[3][0]`` reads as a
reference link (a broken one, failing the strict build) and the doctest output loses its layout; the
package's docstrings use ``Example:`` throughout, and doctest does not care which.
"""

from __future__ import annotations

import re

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # noqa: ARG002  (griffe's hook signature)
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
