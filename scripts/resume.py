"""Resuming a killed training job: its checkpoints are kept only for exactly the same settings."""

import json
import os
import shutil
from pathlib import Path

SIGNATURE_FILE = "run_signature.json"


def checkpoint_is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def prepare_checkpoints(checkpoint_dir: Path, signature: dict, logger) -> str | None:
    """The checkpoint to resume from, if one exists for exactly these settings."""
    from transformers.trainer_utils import get_last_checkpoint

    signature_path = checkpoint_dir / SIGNATURE_FILE
    if checkpoint_dir.is_dir():
        previous = json.loads(signature_path.read_text()) if signature_path.is_file() else None
        if previous != signature:
            logger.warning("checkpoints in %s were made with other settings: discarded", checkpoint_dir)
            shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # Replaced whole (a rename): a process reading it meanwhile sees the old or the new settings.
    written = signature_path.with_name(f".{SIGNATURE_FILE}.{os.getpid()}")
    written.write_text(json.dumps(signature, indent=2, sort_keys=True))
    os.replace(written, signature_path)
    # A kill during a save leaves a partial checkpoint: trainer_state.json is written last.
    while (last := get_last_checkpoint(str(checkpoint_dir))) and not checkpoint_is_complete(Path(last)):
        logger.warning("discarding incomplete checkpoint %s (killed while saving)", last)
        shutil.rmtree(last)
    if last:
        logger.info("resuming from %s", last)
    return last


def progress_at(resume_from: str | None) -> tuple[int, int]:
    """(tokens seen, global step) at the checkpoint a run resumes from; (0, 0) for a fresh run."""
    if not resume_from:
        return 0, 0
    state = json.loads((Path(resume_from) / "trainer_state.json").read_text())
    return state.get("num_input_tokens_seen", 0), state["global_step"]
