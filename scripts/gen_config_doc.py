"""Generate docs/configuration.md from engine.config.Config and the `engine serve` flags.

    python scripts/gen_config_doc.py          # rewrite docs/configuration.md
    python scripts/gen_config_doc.py --check  # exit 1 when the committed file differs

Every Config field is one row: its flag (if `engine serve` has one), its ENGINE_<NAME> variable,
its type and default, and its help: the flag's help text, else the comment on or above the field
in engine/config.py. A field with neither fails the generation (add a flag with help, or a
comment). tests/test_docs.py fails when the committed file drifts from what this prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import re
import sys
import tokenize
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.cli import build_parser  # noqa: E402
from engine.config import Config  # noqa: E402

OUT = ROOT / "docs" / "configuration.md"
COMMAND = "python scripts/gen_config_doc.py"

HEADER = f"""\
# Configuration

<!-- Generated from engine/config.py and `engine serve --help` by `{COMMAND}`; do not edit by
hand (tests/test_docs.py fails when this file and the code disagree). -->

`engine serve` builds one frozen `Config` (engine/config.py) from, in order of precedence:

1. its command-line flags,
2. environment variables `ENGINE_<NAME>` (the field's name in capitals: `ENGINE_HTTP_PORT=8000`),
3. the defaults below.

Booleans in the environment are `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`; a value that does
not parse is an error that names the variable, never a silent default. `engine keys ...` reads
`--store` / `ENGINE_STORE_URL` the same way; `engine generate` reads the runtime flags
(`--device`, `--compute-type`, threads).

"""


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            serve: argparse.ArgumentParser = action.choices["serve"]
            return serve
    raise SystemExit("engine's parser has no serve command")


def field_comments() -> dict[str, str]:
    """Each Config field's comment: on its line, else the comment lines right above it."""
    source = inspect.getsource(Config)
    comments: dict[str, str] = {}
    pending: list[str] = []
    line_of_field: dict[int, str] = {}
    for number, line in enumerate(source.splitlines(), 1):
        match = re.match(r"\s+([a-z_][a-z0-9_]*)\s*:", line)
        if match and match.group(1) in {f.name for f in dataclasses.fields(Config)}:
            line_of_field[number] = match.group(1)
    trailing: dict[int, str] = {}
    own_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.line.strip().startswith("#"):
                own_line[tok.start[0]] = text
            else:
                trailing[tok.start[0]] = text
    for number in range(1, len(source.splitlines()) + 1):
        if number in own_line:
            pending.append(own_line[number])
            continue
        name = line_of_field.get(number)
        if name is not None:
            # The comment on the field's line wins; else the block above it (a section header
            # such as "# transports" above a field with its own comment is not its help).
            text = re.sub(r"/ (?=\w)", "/", trailing.get(number) or " ".join(pending))
            if text:
                comments[name] = text
        pending = []
    return comments


def type_name(field: dataclasses.Field[Any]) -> str:
    text = str(field.type).replace("Optional[", "").replace("]", "")
    return text.replace(" | None", " (optional)")


def default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    serve = serve_parser()
    flags = {a.dest: a for a in serve._actions if a.option_strings}
    comments = field_comments()
    rows = ["| setting | flag | environment | type | default | what it does |", "|---|---|---|---|---|---|"]
    missing = []
    for f in dataclasses.fields(Config):
        action = flags.get(f.name)
        flag = ", ".join(f"`{o}`" for o in action.option_strings) if action else "—"
        help_text = (action.help if action and action.help else None) or comments.get(f.name)
        if not help_text:
            missing.append(f.name)
            continue
        rows.append(
            f"| `{f.name}` | {flag} | `ENGINE_{f.name.upper()}` | {cell(type_name(f))} | "
            f"`{cell(default_text(f.default))}` | {cell(help_text)} |"
        )
    if missing:
        raise SystemExit(
            f"Config fields without help: {', '.join(missing)}: give each a flag with help text or a "
            "comment on or above it in engine/config.py"
        )
    other = [
        a
        for a in serve._actions
        if a.option_strings and a.dest not in {f.name for f in dataclasses.fields(Config)}
    ]
    extra = ""
    if any(a.dest != "help" for a in other):
        lines = ["", "Flags of `engine serve` that are not settings:", ""]
        for a in other:
            if a.dest == "help":
                continue
            lines.append(f"- {', '.join(f'`{o}`' for o in a.option_strings)}: {a.help}")
        extra = "\n".join(lines) + "\n"
    return HEADER + "\n".join(rows) + "\n" + extra


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if OUT.is_file() and OUT.read_text() == text:
            print(f"{OUT.relative_to(ROOT)} is current")
            return 0
        print(f"{OUT.relative_to(ROOT)} is stale: run `{COMMAND}`", file=sys.stderr)
        return 1
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
