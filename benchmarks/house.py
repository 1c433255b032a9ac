"""The house's shape, measured by reading the code (issue 26's before/after table).

    python benchmarks/house.py            # longest functions, up-imports, lines per package, duplicates

Up-imports: an import inside the core package ``jaxdiff`` (the CLI excepted) of ``conversion``,
``tuning`` or ``demos``; or of ``demos`` from anywhere.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jaxdiff", "conversion", "tuning", "demos")


def functions(path):
    tree = ast.parse(path.read_text())
    stack = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                n_args = len(child.args.args) + len(child.args.kwonlyargs) + len(child.args.posonlyargs)
                stack.append((child.end_lineno - child.lineno + 1, n_args, f"{path.relative_to(ROOT)}::{name}"))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return stack


def up_imports():
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT)
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    top = n.split(".")[0]
                    core = pkg == "jaxdiff" and rel.as_posix() != "jaxdiff/cli.py"
                    if (core and top in ("conversion", "tuning", "demos")) or (top == "demos" and pkg != "demos"):
                        found.append(f"{rel}:{node.lineno} imports {n}")
    return found


def main():
    fns = [f for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) for f in functions(p)]
    fns.sort(reverse=True)
    print("| lines | parameters | function |\n|---|---|---|")
    for n, a, name in fns[:10]:
        print(f"| {n} | {a} | `{name}` |")
    ups = up_imports()
    print(f"\nup-imports: {len(ups)}")
    for u in ups:
        print("  ", u)
    print("\n| package | files | lines |\n|---|---|---|")
    for pkg in PACKAGES:
        files = sorted((ROOT / pkg).rglob("*.py"))
        print(f"| {pkg} | {len(files)} | {sum(len(f.read_text().splitlines()) for f in files)} |")
    try:
        out = subprocess.run(["duplicates", "--most", "1", "--seconds", "120"], cwd=ROOT,
                             capture_output=True, text=True).stdout
        print("\nduplicates (whole tree):", out.splitlines()[0] if out else "n/a")
    except FileNotFoundError:
        print("\nduplicates: tool not on PATH")


if __name__ == "__main__":
    sys.exit(main())
