#!/usr/bin/env python3
"""make-calib.py: calibration text for `lightmoe quantize` from the
documentation strings of the Python packages installed on this machine.

Module, class and function docstrings are read with `ast` from the .py
files under the given roots (nothing is imported or executed), cleaned
with inspect.cleandoc, de-duplicated, and written one after another,
separated by blank lines, in sorted path order (deterministic for a given
machine). Never feed evaluation data (eval.safetensors) to the quantizer:
this script is the calibration source for docs/QUALITY.md.

    tools/make-calib.py --out calib.txt [--max-mb 8] [ROOT ...]

Default roots: /usr/lib/python3/dist-packages and the standard library of
the running interpreter.
"""
import argparse
import ast
import inspect
import os
import sys
import sysconfig


def docstrings(path):
    try:
        with open(path, "rb") as f:
            src = f.read()
        tree = ast.parse(src, filename=path)
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError, RecursionError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                doc = inspect.cleandoc(doc).strip()
                if len(doc) >= 40:  # skip one-liners such as "Return x."
                    yield doc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-mb", type=float, default=8.0)
    ap.add_argument("roots", nargs="*")
    a = ap.parse_args()
    roots = a.roots or ["/usr/lib/python3/dist-packages", sysconfig.get_paths()["stdlib"]]
    limit = int(a.max_mb * (1 << 20))
    seen = set()
    size = files = docs = 0
    with open(a.out, "w", encoding="utf-8") as out:
        for root in roots:
            paths = []
            for d, dirs, names in os.walk(root):
                dirs[:] = sorted(x for x in dirs if x not in ("__pycache__", "test", "tests"))
                paths += [os.path.join(d, n) for n in names if n.endswith(".py")]
            for p in sorted(paths):
                files += 1
                for doc in docstrings(p):
                    if doc in seen:
                        continue
                    seen.add(doc)
                    b = len(doc.encode("utf-8")) + 2
                    if size + b > limit:
                        break
                    out.write(doc + "\n\n")
                    size += b
                    docs += 1
                if size >= limit - 64:
                    break
    print(f"{a.out}: {docs} docstrings from {files} files, {size} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
