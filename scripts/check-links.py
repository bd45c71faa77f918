#!/usr/bin/env python3
"""Checks the links of README.md and of the manual (every .md under docs/), standard library only.

    python3 scripts/check-links.py        # from anywhere; exit 0 when every link resolves

Every link or image target must be a path relative to the file it is in, naming a file or
directory of the repository; an anchor (`page.md#section`, `#section`) must name a heading of
its page, by the slug GitHub and mdBook give it (lowercase; letters, digits, `-` and `_` kept;
spaces become `-`; the other characters dropped; `-1`, `-2`... for repeated headings), or an
explicit `{#id}` / `<a id="...">`. No link may leave the repository: any http:// or https://
target, autolink or bare URL is an error, as is any other scheme.

The manual is an mdBook (docs/src): a page made of `{{#include ../page.md}}` (docs/src/
data-model.md and operating.md, whose real files stay in docs/) has the included file's
headings, and the included file's links are checked twice, from where it lies and from the page
that includes it, since they must work in both places. Every page of docs/src must be listed in
docs/src/SUMMARY.md.

Each problem is printed as `file:line: target: reason`; the exit status is 1 if there is any.
"""

import os
import re
import sys
import urllib.parse

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BOOK_SRC = os.path.join(ROOT, "docs", "src")
BOOK_OUT = os.path.join(ROOT, "docs", "book")
SUMMARY = os.path.join(BOOK_SRC, "SUMMARY.md")

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
ATX_HEADING = re.compile(r"^\s{0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$")
SETEXT_UNDERLINE = re.compile(r"^\s{0,3}(=+|-+)\s*$")
EXPLICIT_ID = re.compile(r"\s*\{#([^\s}]+)[^}]*\}\s*$")
HTML_ID = re.compile(r"<[a-zA-Z][^>]*\s(?:id|name)\s*=\s*[\"']([^\"']+)[\"']")
HTML_TARGET = re.compile(r"<(?:a|img)\s[^>]*(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I)
REFERENCE_DEF = re.compile(r"^\s{0,3}\[([^\]]+)\]:\s*<?([^\s>]*)>?")
AUTOLINK = re.compile(r"<([a-zA-Z][a-zA-Z0-9+.-]*:[^>\s]*)>")
BARE_URL = re.compile(r"\bhttps?://[^\s)>\]]+", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
INCLUDE = re.compile(r"(?<!\\)\{\{#(?:include|rustdoc_include)\s+([^}\s]+)\s*\}\}")


def rel(path):
    return os.path.relpath(path, ROOT)


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def prose_lines(lines):
    """(line number, text) of the lines outside fenced code blocks, code spans blanked out."""
    fence = None
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            continue
        if fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
            continue
        yield number, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def slug(text):
    """The id GitHub and mdBook give a heading of this text."""
    text = re.sub(r"<[^>]+>", "", text)                      # HTML tags
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)   # links and images: their text
    text = re.sub(r"&[a-zA-Z]+;|&#\d+;", "", text)           # entities
    text = text.replace("`", "").replace("*", "")            # code and emphasis marks
    out = []
    for ch in text.strip().lower():
        if ch.isalnum() or ch in "-_":
            out.append(ch)
        elif ch.isspace():
            out.append("-")
    return "".join(out)


def included_files(path, lines):
    """(line number, included path, as written) of the mdBook include directives of a file. Like
    mdBook, this reads them everywhere, code included, unless escaped as `\\{{#include …}}`."""
    for number, line in enumerate(lines, 1):
        for match in INCLUDE.finditer(line):
            written = match.group(1)
            target = written.split(":", 1)[0]
            yield number, os.path.normpath(os.path.join(os.path.dirname(path), target)), written


def anchors(path, seen=None):
    """The anchors a page offers: its headings' slugs (included files' too) and explicit ids."""
    seen = seen or set()
    if path in seen or not os.path.isfile(path):
        return set()
    seen = seen | {path}
    lines = read_lines(path)
    found, counts = set(), {}

    def add_heading(text):
        explicit = EXPLICIT_ID.search(text)
        if explicit:
            found.add(explicit.group(1))
            return
        base = slug(text)
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")

    previous = ""
    for number, line in prose_lines(lines):
        heading = ATX_HEADING.match(line)
        if heading:
            add_heading(heading.group(2) or "")
            previous = ""
            continue
        underline = SETEXT_UNDERLINE.match(line)
        if underline and previous.strip() and not previous.lstrip().startswith(("|", "-", "*", ">")):
            add_heading(previous.strip())
            previous = ""
            continue
        found.update(HTML_ID.findall(line))
        previous = line
    for _, included, _ in included_files(path, lines):
        found |= anchors(included, seen)
    return found


def link_targets(lines):
    """(line number, target) of every link, image, reference definition, autolink and bare URL."""
    for number, line in prose_lines(lines):
        spans = []
        # Inline links and images: `](target)` or `](target "title")`, parentheses balanced.
        start = 0
        while True:
            i = line.find("](", start)
            if i < 0:
                break
            j, depth = i + 2, 1
            while j < len(line) and depth:
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                j += 1
            inside = line[i + 2 : j - 1 if depth == 0 else j].strip()
            if inside.startswith("<") and ">" in inside:
                target = inside[1 : inside.index(">")]
            else:
                target = inside.split()[0] if inside.split() else ""
            yield number, target
            spans.append((i, j))
            start = j
        definition = REFERENCE_DEF.match(line)
        if definition and not definition.group(1).startswith("^"):
            yield number, definition.group(2)
            spans.append(definition.span())
        for match in HTML_TARGET.finditer(line):
            yield number, match.group(1)
            spans.append(match.span())
        for match in AUTOLINK.finditer(line):
            yield number, match.group(1)
            spans.append(match.span())
        for match in BARE_URL.finditer(line):
            if not any(a <= match.start() < b for a, b in spans):
                yield number, match.group(0)


def check_target(target, base_dir, page_anchors):
    """Why `target`, written in a file of `base_dir`, is broken; None when it resolves."""
    if not target:
        return "empty link target"
    if SCHEME.match(target):
        if target.lower().startswith(("http://", "https://")):
            return "points outside the repository (no http:// or https:// links: name the product in plain text)"
        return "not a path in the repository (only relative paths may be linked)"
    path, _, anchor = target.partition("#")
    anchor = urllib.parse.unquote(anchor)
    if not path:
        return None if anchor in page_anchors() else f"no heading or id #{anchor} in this page"
    if path.startswith("/"):
        return "absolute path: write it relative to this file"
    resolved = os.path.normpath(os.path.join(base_dir, urllib.parse.unquote(path)))
    if os.path.relpath(resolved, ROOT).startswith(".."):
        return "leaves the repository"
    if not os.path.exists(resolved):
        return f"no such file: {rel(resolved)}"
    if anchor and resolved.endswith(".md") and os.path.isfile(resolved):
        if anchor not in anchors(resolved):
            return f"no heading or id #{anchor} in {rel(resolved)}"
    return None


def markdown_files():
    files = [os.path.join(ROOT, "README.md")]
    for directory, subdirs, names in os.walk(os.path.join(ROOT, "docs")):
        subdirs[:] = sorted(d for d in subdirs if os.path.join(directory, d) != BOOK_OUT)
        files += [os.path.join(directory, n) for n in sorted(names) if n.endswith(".md")]
    return [f for f in files if os.path.isfile(f)]


def main():
    problems = []
    checked = 0

    def check_file(path, lines, base_dir, page, context=""):
        nonlocal checked
        cache = {}

        def page_anchors():
            if "a" not in cache:
                cache["a"] = anchors(page)
            return cache["a"]

        for number, target in link_targets(lines):
            checked += 1
            reason = check_target(target, base_dir, page_anchors)
            if reason:
                problems.append(f"{rel(path)}:{number}: {target}: {reason}{context}")

    files = markdown_files()
    for path in files:
        lines = read_lines(path)
        check_file(path, lines, os.path.dirname(path), path)
        for number, included, written in included_files(path, lines):
            if not os.path.isfile(included):
                problems.append(f"{rel(path)}:{number}: {written}: included file not found: {rel(included)}")
                continue
            # The included text is rendered as this page: its links must work from here too.
            check_file(included, read_lines(included), os.path.dirname(path), path, f" (as included by {rel(path)})")

    # Every page of the book is in its table of contents; other files there are linked from a page.
    if os.path.isdir(BOOK_SRC):
        listed, linked = set(), set()
        if os.path.isfile(SUMMARY):
            for _, target in link_targets(read_lines(SUMMARY)):
                listed.add(os.path.normpath(os.path.join(BOOK_SRC, target.partition("#")[0])))
        else:
            problems.append(f"{rel(SUMMARY)}:1: SUMMARY.md: missing (mdBook's table of contents)")
        for path in files:
            if path.startswith(BOOK_SRC + os.sep):
                for _, target in link_targets(read_lines(path)):
                    linked.add(os.path.normpath(os.path.join(os.path.dirname(path), target.partition("#")[0])))
        for directory, _, names in os.walk(BOOK_SRC):
            for name in sorted(names):
                path = os.path.join(directory, name)
                if path == SUMMARY:
                    continue
                if name.endswith(".md") and path not in listed:
                    problems.append(f"{rel(path)}:1: {rel(path)}: not listed in {rel(SUMMARY)}")
                elif not name.endswith(".md") and path not in linked:
                    problems.append(f"{rel(path)}:1: {rel(path)}: not linked from any page of the book")

    for problem in problems:
        print(problem)
    if problems:
        print(f"check-links: {len(problems)} problem(s) in {len(files)} files", file=sys.stderr)
        return 1
    print(f"check-links: {checked} links in {len(files)} files: all resolve, none leaves the repository")
    return 0


if __name__ == "__main__":
    sys.exit(main())
