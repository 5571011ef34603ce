"""Griffe extension for the API reference: show doctest examples as code blocks.

certkit's docstrings put doctest examples (``>>> ...`` lines and their expected output) anywhere in the text,
not only under a Google-style ``Examples:`` header. Markdown would otherwise read them as paragraphs: the
lines run together and an expression such as ``x[[0, 1]][:, None]`` looks like a reference link. This
extension wraps every doctest block (from a ``>>>`` line to the next blank line, as doctest itself reads it)
in a fenced ``pycon`` code block. It changes only the rendered documentation, never the docstrings in the code.

Loaded by mkdocstrings from ``mkdocs.yml`` (``extensions: [docs/griffe_doctest.py]``).
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Wrap each doctest block of ``text`` in a fenced code block.

    A block starts at a line whose text begins with ``>>>`` and ends before the next blank line (or at the end);
    the fence takes the block's indentation. Lines inside fenced blocks already there are left alone.
    """
    out: list[str] = []
    in_fence = False
    in_doctest = False
    indent = ""
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        if in_doctest and not stripped:
            out.append(f"{indent}```")
            in_doctest = False
        if not in_doctest and stripped.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and not in_doctest and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
            in_doctest = True
        out.append(line)
    if in_doctest:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    """Fence the doctest examples of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is not None and ">>>" in doc.value:
            doc.value = fence_doctests(doc.value)
