"""The model ``make serve`` uses when none is configured (docs/api.md, "Command line").

In order: ``models/flan-t5-small`` when it holds a model folder; else ``google/flan-t5-small``
converted from the Hub into it (giving up within seconds when the Hub cannot be reached); else
the random-weight demo model at ``models/flan-t5-small-demo`` (built once, then reused), with a
loud warning that its outputs are not meaningful text.
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.errors import ModelError
from engine.model.manifest import MANIFEST_NAME, Manifest

log = logging.getLogger(__name__)

DEFAULT_HUB_ID = "google/flan-t5-small"
DEFAULT_DIR_NAME = "flan-t5-small"
DEMO_DIR_NAME = "flan-t5-small-demo"


def resolve_default_model(
    models_dir: Path = Path("models"), *, allow_demo: bool = True, hub_timeout_s: float = 5.0
) -> tuple[Path, bool]:
    """(model folder, random_weights) for a server started without ``--model``."""
    from engine.model.convert import convert_model

    target = models_dir / DEFAULT_DIR_NAME
    if (target / MANIFEST_NAME).is_file():
        return target, Manifest.load(target).random_weights
    if target.exists():
        raise ModelError(
            f"{target} exists but is not a model folder (no {MANIFEST_NAME}): convert a checkpoint into "
            f"it with `engine convert SOURCE --output {target} --force`, or remove it"
        )
    log.info("no model at %s: converting %s from the Hugging Face Hub", target, DEFAULT_HUB_ID)
    try:
        convert_model(DEFAULT_HUB_ID, target, "int8", hub_timeout_s=hub_timeout_s)
        return target, False
    except ModelError as exc:
        if not allow_demo:
            raise ModelError(
                f"no model to serve: {exc.message}. Pass --model DIR, or allow the random-weight "
                "demo model (ENGINE_ALLOW_DEMO_MODEL=1)"
            ) from exc
        log.warning("could not get %s: %s", DEFAULT_HUB_ID, exc.message)
    return _demo_model(models_dir / DEMO_DIR_NAME), True


def _demo_model(path: Path) -> Path:
    from engine.model.demo import build_demo_model

    if (path / MANIFEST_NAME).is_file() and Manifest.load(path).random_weights:
        log.info("reusing the demo model at %s", path)
    else:
        log.warning("building the demo model at %s (FLAN-T5-small shapes, seed 0, int8)", path)
        build_demo_model(path, size="small", seed=0, quantization="int8", force=path.exists())
    for line in (
        "*" * 72,
        "SERVING THE DEMO MODEL: ITS WEIGHTS ARE RANDOM.",
        "Outputs are NOT meaningful text; they only exercise the server.",
        f"Model folder: {path}",
        "For real outputs: engine convert google/flan-t5-small --output models/flan-t5-small",
        "(on a machine that reaches the Hugging Face Hub, or from a copied checkpoint folder).",
        "*" * 72,
    ):
        log.warning(line)
    return path
