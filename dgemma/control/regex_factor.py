"""Common suffixes of alternatives written once: `A X|B X` becomes `(A|B)X`, the same language.

outlines builds a DFA by subset construction, which keeps copies of a sub-pattern apart when the regex writes it
twice: the two copies are different NFA states even where they accept the same texts, and only minimizing merges
them. The schema writer writes such copies: an object whose first key may be any of its first 8 optional keys
writes, after each of them, the later ones (`"a":A("b":B)?("c":C)?|"b":B("c":C)?|"c":C`), and a string with
maxLength 64 is some 640 DFA states per copy. Snowplow sp_152's regex built 119,310 DFA states for 11,463 minimal
ones. Written with each common suffix once (`(("a":A("b":B)?|"b":B)("c":C)?|"c":C)`), the copies are one.

1. Parse the regex (Rust syntax, the part the schema writer uses: literals and escapes, classes, `.`, groups,
   alternation, `?`, `*`, `+`, `{m}`, `{m,}`, `{m,n}`). Anything else (anchors, flags, lookaround, lazy or
   possessive repetition, nested classes) leaves the regex as it is.
2. Groups that add nothing are spliced into what holds them: `(A|B)|C` is `A|B|C` and `x(ab)y` is `xaby`.
3. Alternatives are grouped by their last item, and each group's prefixes are factored the same way (so the
   triangle above becomes nested, each suffix once); an empty prefix makes the rest optional.
Only the shape changes: concatenation distributes over union, so the language is the same.
"""

from __future__ import annotations

_QUANTIFIERS = "?*+{"


class _Parser:
    """Step 1: a recursive-descent parser into nested lists. An alternation is a list of branches, a branch a
    list of items, an item (atom, quantifier text); an atom is its text or, for a group, its alternation."""

    def __init__(self, text: str):
        self.text, self.at = text, 0

    def alternation(self) -> list:
        branches = [self.branch()]
        while self.peek() == "|":
            self.at += 1
            branches.append(self.branch())
        return branches

    def branch(self) -> list:
        items = []
        while self.peek() not in ("", "|", ")"):
            atom = self.atom()
            quantifier = self.quantifier()
            items.append((atom, quantifier))
        return items

    def peek(self) -> str:
        return self.text[self.at:self.at + 1]

    def atom(self):
        text, start = self.text, self.at
        c = text[start]
        if c == "(":
            if text.startswith("(?:", start):
                self.at += 3
            elif text.startswith("(?", start):
                raise ValueError("flags or lookaround")
            else:
                self.at += 1
            inner = self.alternation()
            if self.peek() != ")":
                raise ValueError("unclosed group")
            self.at += 1
            return inner
        if c == "[":
            return self.character_class()
        if c == "\\":
            return self.escape()
        if c in "^$" or c in _QUANTIFIERS:
            raise ValueError("an anchor, or a repetition of nothing")
        self.at += 1
        return c

    def character_class(self) -> str:
        text, start = self.text, self.at
        at = start + 1 + (text[start + 1:start + 2] == "^")
        at += text[at:at + 1] == "]"
        while at < len(text) and text[at] != "]":
            if text[at] == "[":
                raise ValueError("a nested class")
            at += 2 if text[at] == "\\" else 1
        if at >= len(text):
            raise ValueError("unclosed class")
        self.at = at + 1
        return text[start:self.at]

    def escape(self) -> str:
        text, start = self.text, self.at
        if start + 1 >= len(text):
            raise ValueError("a trailing backslash")
        kind = text[start + 1]
        if kind in "bBAzZ<>":
            raise ValueError("an assertion")
        end = start + 2
        if kind in "xuUpP":
            if text[end:end + 1] == "{":
                end = text.find("}", end)
                if end < 0:
                    raise ValueError("unclosed escape")
                end += 1
            else:
                end += {"x": 2, "u": 4, "U": 8}.get(kind, 1)
        self.at = end
        return text[start:end]

    def quantifier(self) -> str:
        text, start = self.text, self.at
        c = self.peek()
        if c and c in "?*+":
            self.at += 1
        elif c == "{":
            end = text.find("}", start)
            body = text[start + 1:end] if end > 0 else ""
            low, _, high = body.partition(",")
            if not low.isdigit() or not (high == "" or high.isdigit()):
                raise ValueError("a malformed repetition")
            self.at = end + 1
        else:
            return ""
        if self.peek() and self.peek() in _QUANTIFIERS:
            raise ValueError("lazy, possessive or stacked repetition")
        return text[start:self.at]


def _item(atom, quantifier: str) -> tuple:
    """(text, atom, quantifier): an item with its text written once."""
    text = atom if isinstance(atom, str) else "(" + "|".join("".join(i[0] for i in b) for b in atom) + ")"
    return text + quantifier, atom, quantifier


def _splice(alternation: list) -> list:
    """Step 2 (and step 3 inside every group, bottom-up). Items come in as (atom, quantifier) and leave as
    `_item`s."""
    out = []
    for branch in alternation:
        items = []
        for atom, quantifier in branch:
            if isinstance(atom, list):
                atom = _factor(_splice(atom))
                if not quantifier and len(atom) == 1:
                    items.extend(atom[0])  # a group of one branch, not repeated: its items
                    continue
            items.append(_item(atom, quantifier))
        if len(items) == 1 and isinstance(items[0][1], list) and not items[0][2]:
            out.extend(items[0][1])  # a branch that is one group of alternatives: those alternatives
        else:
            out.append(items)
    return out


def _factor(branches: list) -> list:
    """Step 3: the alternation with alternatives that end alike written as (their prefixes) then that end."""
    if len(branches) < 2:
        return branches
    groups: dict[str, list] = {}
    for branch in branches:
        groups.setdefault(branch[-1][0] if branch else "", []).append(branch)
    out = []
    for key, same in groups.items():
        if len(same) == 1 or not key:
            out.extend(same[:1] if not key else same)
            continue
        shared = 1  # the longest suffix that all of them share
        while all(len(b) > shared for b in same) and len({b[-1 - shared][0] for b in same}) == 1:
            shared += 1
        suffix = same[0][-shared:]
        prefixes = _factor([b[:-shared] for b in same])
        if len(prefixes) == 1:
            out.append(prefixes[0] + suffix)
        elif [] in prefixes:
            out.append([_item([p for p in prefixes if p], "?")] + suffix)
        else:
            out.append([_item(prefixes, "")] + suffix)
    return out


def factor_suffixes(regex: str) -> str:
    """`regex` with common suffixes of alternatives written once (the same language), or `regex` itself when it
    uses syntax that step 1 does not parse."""
    parser = _Parser(regex)
    try:
        tree = parser.alternation()
        if parser.at != len(regex):
            return regex  # an unmatched ')'
        return "|".join("".join(item[0] for item in branch) for branch in _factor(_splice(tree)))
    except (ValueError, RecursionError):  # a construct step 1 does not rewrite
        return regex
