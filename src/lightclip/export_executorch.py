"""ExecuTorch export of a lightclip dual encoder: both towers as programs lowered to the XNNPACK delegate, for
ExecuTorch's Android, iOS and C++ runtimes.

`export_executorch(model_dir, output_dir)` writes `image_encoder.pte` and `text_encoder.pte`, with the inputs and
outputs of the ONNX graphs of `lightclip.export` (the batch bounded by `max_batch_size`), next to the same
`preprocessing.json`, tokenizer and image processor files; `ExecuTorchClip` runs them in ExecuTorch's Python runtime
with `OnnxClip`'s interface. It needs the `executorch` extra.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .export import (
    PREPROCESSING_FILE,
    TOWERS,
    ImageEncoder,
    TextEncoder,
    example_pixels,
    example_text,
    inference_copy,
    preprocessing_spec,
    save_preprocessing,
)

PTE_IMAGE_FILE = "image_encoder.pte"
PTE_TEXT_FILE = "text_encoder.pte"
PTE_FILES = dict(zip(TOWERS, (PTE_IMAGE_FILE, PTE_TEXT_FILE)))
# ExecuTorch plans memory for the largest shapes a program accepts, so its batch axis needs an upper bound
EXECUTORCH_MAX_BATCH = 32


# what torch.export and ExecuTorch log for the text tower's data-dependent branch (see `_executorch_program`)
_EXPORT_LOGGERS = ("torch.export", "torch.fx.experimental.symbolic_shapes", "torch._export")


@contextlib.contextmanager
def _quiet_loggers(names: Sequence[str], level: int = logging.ERROR):
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger_.level for logger_ in loggers]
    for logger_ in loggers:
        logger_.setLevel(level)
    try:
        yield
    finally:
        for logger_, previous in zip(loggers, levels):
            logger_.setLevel(previous)


def _require_executorch():
    try:
        import executorch.exir  # noqa: F401
    except ImportError as error:
        raise ImportError("ExecuTorch export needs the executorch package: pip install 'lightclip[executorch]'"
                          ) from error


def _executorch_program(module: nn.Module, args: tuple, dynamic_shapes: tuple, data_dependent: bool = False
                        ) -> bytes:
    """`module` through `torch.export`, lowered to the XNNPACK delegate, as the bytes of a .pte program.

    `data_dependent`: the module branches on tensor values, which `torch.export.export` refuses. The text tower does:
    it skips the attention mask when `attention_mask.all()`, a shortcut that does not change the result.
    `torch.export.draft_export` follows the branch of the padded example (the mask applied, as in the traced ONNX
    graph) and guards that choice with runtime asserts; those are dropped here, so an unpadded batch takes the same
    path. ExecuTorch drops every assert when lowering anyway, but its edge verifier rejects the symbolic nodes that
    feed these."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad(), _quiet_loggers(_EXPORT_LOGGERS):
        if data_dependent:
            program = torch.export.draft_export(module, args, dynamic_shapes=dynamic_shapes)
            graph = program.graph_module.graph
            for node in list(graph.nodes):
                if node.target is torch.ops.aten._assert_scalar.default:
                    graph.erase_node(node)
            graph.eliminate_dead_code()
            program.graph_module.recompile()
        else:
            program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def export_towers_executorch(model, output_dir: str | os.PathLike, tokenizer=None,
                             max_batch_size: int = EXECUTORCH_MAX_BATCH, towers: Sequence[str] = TOWERS
                             ) -> dict[str, Path]:
    """Write `image_encoder.pte` and `text_encoder.pte` (those named in `towers`) for an in-memory `LightClipModel`:
    `encode_image` / `encode_text` as ExecuTorch programs lowered to XNNPACK, with the ONNX graphs' inputs and outputs.

    They are exported from a float32, eval-mode, fused copy whose CNN weights are contiguous: XNNPACK chooses its own
    layout, and its channels-last pass rejects weights already in `channels_last`. The batch may be 1 to
    `max_batch_size` (ExecuTorch plans memory for the largest input), the text length 1 to the context length.
    `tokenizer` only supplies a realistic example text."""
    _require_executorch()
    unknown = set(towers) - set(TOWERS)
    if unknown or not towers:
        raise ValueError(f"towers must be a non-empty subset of {TOWERS}, not {towers!r}")
    if max_batch_size < 2:
        raise ValueError("max_batch_size must be at least 2 (the example batch keeps the batch axis symbolic)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = inference_copy(model, memory_format=torch.contiguous_format)
    batch = torch.export.Dim("batch", min=1, max=max_batch_size)
    programs = {}
    if "image_encoder" in towers:
        programs["image_encoder"] = _executorch_program(ImageEncoder(model), (example_pixels(model.config),),
                                                        ({0: batch},))
    if "text_encoder" in towers:
        text = example_text(model.config, tokenizer)
        shape = {0: batch, 1: torch.export.Dim("sequence", min=1, max=model.config.text_config.max_position_embeddings)}
        programs["text_encoder"] = _executorch_program(TextEncoder(model), (text["input_ids"], text["attention_mask"]),
                                                       (shape, shape), data_dependent=True)
    paths = {}
    for name, program in programs.items():
        paths[name] = output_dir / PTE_FILES[name]
        paths[name].write_bytes(program)
    return paths


def export_executorch(model_dir: str | os.PathLike, output_dir: str | os.PathLike,
                      max_batch_size: int = EXECUTORCH_MAX_BATCH) -> dict[str, Path]:
    """Export both towers of a saved lightclip folder to ExecuTorch (`export_towers_executorch`), with
    preprocessing.json and the tokenizer and image processor files, as `export_onnx` does. Returns the written
    paths."""
    from . import LightClipModel, LightClipProcessor

    _require_executorch()
    from executorch.version import __version__ as executorch_version

    model = LightClipModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = LightClipProcessor.from_pretrained(model_dir)
    paths = export_towers_executorch(model, output_dir, tokenizer=processor.tokenizer, max_batch_size=max_batch_size)
    spec = preprocessing_spec(model, processor)
    spec["files"] = dict(PTE_FILES)
    spec["source"] = {"model": str(model_dir), "torch": torch.__version__, "executorch": executorch_version,
                      "backend": "XNNPACK", "max_batch_size": max_batch_size}
    paths["preprocessing"] = save_preprocessing(spec, processor, Path(output_dir))
    return paths


class ExecuTorchClip:
    """The exported `.pte` towers in ExecuTorch's Python runtime (XNNPACK on the CPU), with `OnnxClip`'s interface,
    numpy in and out, so the ONNX parity checks and `OnnxClipForEvaluation` take it as they are. A batch above the
    programs' bound runs in slices. `threads` resizes ExecuTorch's thread pool, which is process-wide.

    Example:

    ```python
    >>> clip = ExecuTorchClip("exported/", threads=1)                   # doctest: +SKIP
    >>> clip.encode_image(pixel_values).shape                           # doctest: +SKIP
    (2, 64)
    ```
    """

    def __init__(self, export_dir: str | os.PathLike, threads: int | None = None):
        _require_executorch()
        from executorch.runtime import Runtime

        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)
        export_dir = Path(export_dir)
        runtime = Runtime.get()
        self.methods = {name: runtime.load_program(export_dir / file).load_method("forward")
                        for name, file in PTE_FILES.items() if (export_dir / file).is_file()}
        if not self.methods:
            raise FileNotFoundError(f"no {PTE_IMAGE_FILE} or {PTE_TEXT_FILE} in {export_dir}")
        spec = export_dir / PREPROCESSING_FILE
        self.preprocessing = json.loads(spec.read_text(encoding="utf-8")) if spec.is_file() else None

    def _run(self, name: str, *inputs: np.ndarray) -> np.ndarray:
        if name not in self.methods:
            raise FileNotFoundError(f"this export has no {PTE_FILES[name]}")
        method = self.methods[name]
        bound = method.metadata.input_tensor_meta(0).sizes()[0]
        tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
        outputs = [method.execute([t[start : start + bound] for t in tensors])[0]
                   for start in range(0, len(tensors[0]), bound)]
        return torch.cat(outputs).numpy()

    def encode_image(self, pixel_values):
        return self._run("image_encoder", np.asarray(pixel_values, dtype=np.float32))

    def encode_text(self, input_ids, attention_mask):
        return self._run("text_encoder", np.asarray(input_ids, dtype=np.int64),
                         np.asarray(attention_mask, dtype=np.int64))


__all__ = ["EXECUTORCH_MAX_BATCH", "ExecuTorchClip", "export_executorch", "export_towers_executorch"]
