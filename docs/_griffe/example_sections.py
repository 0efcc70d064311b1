"""A griffe extension for the API reference: a Google-style `Example:` section is an examples section.

Google style (and Sphinx's napoleon) accept `Example:` and `Examples:` alike; griffe reads only `Examples:` as
examples and renders `Example:` as a note, so its `>>>` lines would come out as prose. mkdocs.yml loads this
file (`extensions:` of the mkdocstrings python handler); the build does not copy it into the site (`exclude_docs`).
"""

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", flags=re.M)


class ExampleSections(griffe.Extension):
  """Renames each `Example:` section header of a docstring to `Examples:` before griffe parses it."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    if obj.docstring is not None:
      obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
