"""The README's quick start runs as written and says what it prints."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_code() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_quick_start_runs_and_classifies_the_cherry_as_food(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {}
    exec(compile(_quick_start_code(), "README.md quick start", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "'label': 'food'" in printed.splitlines()[0].split("}")[0]  # the first label, the highest score
    similarity = namespace["image_embeds"] @ namespace["text_embeds"].T
    assert torch.equal(similarity.argmax(dim=1), torch.arange(len(similarity)))  # "the diagonal is highest"


def test_the_preset_table_gives_each_presets_parameters():
    from lightclip import LightClipConfig, LightClipModel

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Presets"):readme.index("## Results")]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 9

    def millions(*modules) -> str:
        return f"{sum(p.numel() for m in modules for p in m.parameters()) / 1e6:.2f} M"

    for name, *_, total, image, text in rows:
        model = LightClipModel(LightClipConfig.from_preset(name.strip().split()[0].strip("`")))
        assert [total.strip(), image.strip(), text.strip()] == [
            millions(model), millions(model.vision_model, model.visual_projection),
            millions(model.text_model, model.text_projection)], name
