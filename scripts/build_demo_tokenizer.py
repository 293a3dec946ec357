"""Rebuild the demo model's tokenizer: engine/model/data/demo_corpus.txt and demo_spiece.model.

The project ships both files; this script is how they were made, so they can be checked and
rebuilt:

  .venv/bin/python scripts/build_demo_tokenizer.py            # retrain spiece from the shipped corpus
  .venv/bin/python scripts/build_demo_tokenizer.py --corpus   # also re-extract the corpus

The corpus is English prose from the docstrings of CPython's standard library (PSF license, see
engine/model/data/PSF-LICENSE.txt), read with ``ast`` (nothing is imported or run). Re-extracting
it on another Python version gives another corpus; retraining on the shipped corpus gives the
shipped tokenizer byte for byte (``tests/test_tokenizer.py`` checks that).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.model.demo import DEMO_CORPUS, DEMO_SPIECE, train_demo_tokenizer  # noqa: E402

MAX_CORPUS_CHARS = 1_000_000
SKIP_PARTS = {
    "test",
    "tests",
    "idlelib",
    "turtledemo",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
}


def _paragraphs(doc: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", doc):
        text = " ".join(line.strip() for line in para.splitlines()).strip()
        # Keep prose: a sentence of several words, mostly letters, no doctest or code lines.
        if len(text) < 40 or text.startswith((">>>", "...", "$", "|", "+", "-", "*", ":")):
            continue
        letters = sum(c.isalpha() or c == " " for c in text)
        if letters / len(text) < 0.85:
            continue
        out.append(text)
    return out


def extract_corpus() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    lines: list[str] = []
    size = 0
    for path in sorted(stdlib.rglob("*.py")):
        if SKIP_PARTS.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [
            tree,
            *(
                n
                for n in ast.walk(tree)
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            ),
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in _paragraphs(doc):
                if para in seen:
                    continue
                seen.add(para)
                lines.append(para)
                size += len(para) + 1
                if size >= MAX_CORPUS_CHARS:
                    return "\n".join(lines) + "\n"
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus", action="store_true", help="re-extract the corpus from this Python's stdlib"
    )
    args = parser.parse_args()
    if args.corpus:
        DEMO_CORPUS.write_text(extract_corpus(), encoding="utf-8")
        print(f"wrote {DEMO_CORPUS} ({DEMO_CORPUS.stat().st_size} bytes)")
    train_demo_tokenizer(DEMO_CORPUS, DEMO_SPIECE)
    print(f"wrote {DEMO_SPIECE} ({DEMO_SPIECE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
