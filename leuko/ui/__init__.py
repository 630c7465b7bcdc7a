"""Helpers shared by the Streamlit pages; the only part of leuko allowed to import Streamlit."""

import re

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:=&])")


def plain(text: object) -> str:
    """``text`` with every character that Streamlit's markdown would interpret escaped, for
    user-typed text (references, notes, file and user names) shown in markdown: an image link
    in a case's notes would otherwise be fetched by every reviewer's browser, and ``:red[...]``
    or ``$...$`` would be drawn as colour or formulas."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))
