"""A Babel extractor for translated text that is not a literal in a gettext call.

The research-use banner is one constant, appliance.RESEARCH_USE_BANNER, shared by every page, report, API
answer and DICOM output; it stays the English source. The UI shows it translated beside the English
(`gettext(RESEARCH_USE_BANNER)`), so its catalogue entry must follow the constant: babel.cfg runs this
extractor on appliance/__init__.py, and `pybabel extract` puts the constant's current text in messages.pot
like any other string. A change of the English text then makes the old translation unused (the page falls
back to English, never to a translation of something else) and test_web_i18n fails until it is translated.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

# the module-level string constants, by name, that the UI shows translated
TRANSLATED_CONSTANTS = ("RESEARCH_USE_BANNER",)
TRANSLATOR_NOTE = ("Shown on every page beside the English. Keep its full force: research use only, not for "
                   "clinical use, what the models were trained on, and that results must not guide diagnosis "
                   "or treatment.")


def extract_constants(fileobj, keywords, comment_tags, options) -> Iterator[tuple[int, None, str, list[str]]]:  # noqa: ARG001 - Babel's extractor signature
    """Yield (line, funcname, message, comments) for each TRANSLATED_CONSTANTS assignment in a Python file."""
    tree = ast.parse(fileobj.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in TRANSLATED_CONSTANTS
                                                for t in node.targets):
            value = ast.literal_eval(node.value)
            if isinstance(value, str):
                yield node.lineno, None, value, [TRANSLATOR_NOTE]
