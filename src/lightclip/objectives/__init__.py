"""The training objectives of `LightClipForPreTraining`, one module per family, registered in `OBJECTIVE_CLASSES`.

Each module holds its objectives (`Objective` subclasses: their training-only parameters, the features step and the
model-card row) and their loss maths (one `nn.Module` per loss, in the shape of open_clip's `loss.py`: it takes
features, never raw batches, handles data parallelism itself through `distributed`, and returns a dict whose keys end
in `_loss`). `LightClipForPreTraining` and the training script read only the registry and what `base.Objective`
declares. Adding an objective is one module here and its line in the registry, its settings as fields of
`LightClipPretrainingConfig` and its name in `configuration_lightclip.OBJECTIVES` (docs/architecture.md).

Training-only: the inference model never imports this package.
"""

from __future__ import annotations

from ..configuration_lightclip import LightClipConfig, resolve_objectives
from ..modeling_lightclip import LightClipModel
from .base import Objective, TargetSource, TowerOutputs
from .contrastive import ClipObjective, SoftClipObjective
from .distillation import AffinityDistillationObjective, FeatureDistillationObjective
from .mlm import MaskedLanguageModelingObjective
from .neighbors import CrossNeighborObjective, NeighborObjective
from .siglip import SigLipObjective
from .token_matching import TokenMatchingObjective

# in the canonical order of `configuration_lightclip.OBJECTIVES`
OBJECTIVE_CLASSES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (ClipObjective, SoftClipObjective, SigLipObjective, TokenMatchingObjective,
                              MaskedLanguageModelingObjective, NeighborObjective, CrossNeighborObjective,
                              AffinityDistillationObjective, FeatureDistillationObjective)
}


def build_objective(name: str, config: LightClipConfig, model: LightClipModel) -> Objective:
    """The objective `name` for `config`; `model` is read (never kept) by objectives that size themselves on it."""
    return OBJECTIVE_CLASSES[name](config, model)


def objectives_needing(objectives: str | list[str] | tuple[str, ...], need: str) -> list[str]:
    """The objectives among `objectives` (names or groups, resolved as the config does) that declare `need`, one of
    the `Objective.needs_*` class attributes: what the training script prepares before any model exists."""
    return [name for name in resolve_objectives(objectives) if getattr(OBJECTIVE_CLASSES[name], need)]


__all__ = ["OBJECTIVE_CLASSES", "Objective", "TargetSource", "TowerOutputs", "build_objective", "objectives_needing"]
