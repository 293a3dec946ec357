"""Generate engine/pb/ from proto/ (run by `make install` / `make proto`).

python scripts/gen_proto.py          # regenerate
python scripts/gen_proto.py --check  # exit 1 when the generated code is missing or stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.api import protogen


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only check that engine/pb is current")
    args = parser.parse_args()
    if args.check:
        if protogen.is_current():
            print("engine/pb is current")
            return 0
        print("engine/pb is missing or stale: run `make proto`", file=sys.stderr)
        return 1
    for path in protogen.generate():
        print(f"wrote {path.relative_to(protogen.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
