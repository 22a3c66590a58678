"""The inference path needs only the core install: `import lightclip`, a checkpoint and the zero-shot pipeline must
work without the `train` extra's libraries (accelerate, datasets, evaluate, scipy, matplotlib)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

TRAIN_ONLY = ("accelerate", "datasets", "evaluate", "scipy", "matplotlib")

SCRIPT = textwrap.dedent(f"""
    import sys
    for name in {TRAIN_ONLY!r}:
        sys.modules[name] = None  # as if not installed: importing it raises, find_spec() says absent

    import numpy as np
    from PIL import Image
    from transformers import pipeline

    import lightclip
    from lightclip import LightClipConfig, LightClipModel, LightClipProcessor

    config = LightClipConfig.from_preset("lightclip-xxs")
    LightClipModel(config).save_pretrained(sys.argv[1])
    LightClipProcessor.from_config(config).save_pretrained(sys.argv[1])
    classifier = pipeline("zero-shot-image-classification", model=sys.argv[1])
    image = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    scores = classifier(image, candidate_labels=["a circle", "a square"])
    assert len(scores) == 2, scores
    loaded = [m for m in sys.modules if m.startswith("lightclip.") and sys.modules[m] is not None]
    print(sorted(loaded))
""")


def test_inference_needs_no_training_library(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "model")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = eval(result.stdout.strip().splitlines()[-1])
    training = {"lightclip.pretraining", "lightclip.objectives", "lightclip.losses", "lightclip.data",
                "lightclip.evaluation", "lightclip.neighbors", "lightclip.teachers", "lightclip.trainer_utils"}
    assert not training & set(loaded), loaded
