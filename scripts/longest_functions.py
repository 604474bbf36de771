#!/usr/bin/env python3
"""Lists the longest Rust functions under the given directories (default: core and server
sources), by lines from `fn` to its closing brace. A rough measure for code review: it
counts braces, skipping strings, chars and comments well enough for this code base.

    python3 scripts/longest_functions.py [DIR...] [--top N]
"""
import os
import re
import sys

FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(async\s+)?(const\s+)?(unsafe\s+)?fn\s+(\w+)")


def strip(line):
    """The line without string literals, char literals and // comments."""
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])'", "''", line)
    return line.split("//", 1)[0]


def functions(path):
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    i = 0
    while i < len(lines):
        m = FN.match(lines[i])
        if not m:
            i += 1
            continue
        depth, opened, j = 0, False, i
        while j < len(lines):
            code = strip(lines[j])
            if not opened and ";" in code and "{" not in code:
                break  # a declaration without a body (trait method)
            depth += code.count("{") - code.count("}")
            opened = opened or "{" in code
            if opened and depth <= 0:
                yield (j - i + 1, m.group(6), path, i + 1)
                break
            j += 1
        i += 1


def main():
    args = sys.argv[1:]
    top = 10
    if "--top" in args:
        k = args.index("--top")
        top = int(args[k + 1])
        del args[k : k + 2]
    roots = args or ["crates/core/src", "crates/server/src"]
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                if name.endswith(".rs") and "tests" not in name:
                    found.extend(functions(os.path.join(dirpath, name)))
    for length, name, path, line in sorted(found, reverse=True)[:top]:
        print(f"{length:5d}  {name}  {path}:{line}")


if __name__ == "__main__":
    main()
