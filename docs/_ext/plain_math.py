"""Math in the docstrings rendered as HTML text (Unicode symbols, superscripts, subscripts), with no JavaScript and
no network: the pages read the same offline. Covers the TeX the library's docstrings use; anything else is shown as
it is written."""

from __future__ import annotations

import html
import re

from docutils import nodes, utils
from docutils.parsers.rst import Directive

SYMBOLS = {
    r"\hat\rho": "ρ̂",
    r"\hat\eta": "η̂",
    r"\rho": "ρ",
    r"\kappa": "κ",
    r"\beta": "β",
    r"\gamma": "γ",
    r"\eta": "η",
    r"\zeta": "ζ",
    r"\theta": "θ",
    r"\leftarrow": "←",
    r"\mu": "μ",
    r"\alpha": "α",
    r"\lambda": "λ",
    r"\epsilon": "ε",
    r"\sigma": "σ",
    r"\tau": "τ",
    r"\pi": "π",
    r"\geq": "≥",
    r"\ge": "≥",
    r"\leq": "≤",
    r"\le": "≤",
    r"\in": "∈",
    r"\to": "→",
    r"\propto": "∝",
    r"\cos": "cos",
    r"\ln": "ln",
    r"\min": "min",
    r"\max": "max",
    r"\qquad": "\u2003\u2003",
    r"\quad": "\u2003",
    r"\,": "\u2009",
    r"\ ": " ",
    r"\big": "",
    r"\Big": "",
    r"\left": "",
    r"\right": "",
    r"\cdot": "·",
    r"\times": "×",
}


def _group(text: str, start: int) -> tuple[str, int]:
    """The argument at ``start``: a ``{...}`` group (nested) or one character/command; and where it ends."""
    if start >= len(text):
        return "", start
    if text[start] == "{":
        depth = 0
        for index in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                return text[start + 1 : index], index + 1
    if text[start] == "\\":
        match = re.match(r"\\[A-Za-z]+", text[start:])
        if match:
            return match.group(0), start + len(match.group(0))
    return text[start], start + 1


def to_html(tex: str) -> str:
    """TeX as HTML text."""
    out: list[str] = []
    index = 0
    while index < len(tex):
        char = tex[index]
        if tex.startswith(r"\frac", index):
            top, index = _group(tex, index + 5)
            bottom, index = _group(tex, index)
            short = len(top + bottom) <= 2
            out.append(f"{to_html(top)}/{to_html(bottom)}" if short else f"({to_html(top)})/({to_html(bottom)})")
            continue
        if tex.startswith(r"\sqrt", index):
            body, index = _group(tex, index + 5)
            out.append(f"√{to_html(body)}" if len(body) <= 1 or body.startswith("\\") else f"√({to_html(body)})")
            continue
        if tex.startswith((r"\mathrm", r"\text"), index):
            name = r"\mathrm" if tex.startswith(r"\mathrm", index) else r"\text"
            body, index = _group(tex, index + len(name))
            out.append(html.escape(body))
            continue
        if char in "^_":
            body, index = _group(tex, index + 1)
            tag = "sup" if char == "^" else "sub"
            out.append(f"<{tag}>{to_html(body)}</{tag}>")
            continue
        if char == "\\":
            for macro in sorted(SYMBOLS, key=len, reverse=True):
                after = tex[index + len(macro) : index + len(macro) + 1]
                if tex.startswith(macro, index) and not (macro[-1].isalpha() and after.isalpha()):
                    out.append(SYMBOLS[macro])
                    index += len(macro)
                    break
            else:
                out.append(html.escape(char))
                index += 1
            continue
        if char in "{}":
            index += 1
            continue
        out.append(html.escape(char))
        index += 1
    return "".join(out)


def math_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    tex = utils.unescape(text, restore_backslashes=True)  # docutils hands a role its text with escapes marked
    return [nodes.raw(rawtext, f'<span class="math-text"><em>{to_html(tex)}</em></span>', format="html")], []


class MathDirective(Directive):
    has_content = True
    optional_arguments = 1
    final_argument_whitespace = True

    def run(self):
        tex = " ".join([*self.arguments, *self.content])
        if r"\begin{cases}" in tex:  # one line per case
            body = tex.split(r"\begin{cases}", 1)[1].split(r"\end{cases}", 1)[0]
            head = tex.split(r"\begin{cases}", 1)[0]
            cases = [case.replace("&", "\u2003if ") for case in body.split(r"\\")]
            lines = [to_html(head) + to_html(cases[0].strip()), *("\u2003" * 4 + to_html(c.strip()) for c in cases[1:])]
            rendered = "<br>".join(lines)
        else:
            rendered = to_html(tex)
        return [nodes.raw("", f'<div class="math-text"><p><em>{rendered}</em></p></div>', format="html")]


def setup(app):
    app.add_role("math", math_role, override=True)
    app.add_directive("math", MathDirective, override=True)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
