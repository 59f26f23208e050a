"""Graph flavors, one object each, looked up by name from one table (as llama2.c's export dispatches on a version).

A flavor knows how to build its graph with weights bound lazily to a source, which initializers the saved graph
must hold, and how to check it numerically against the streamed PyTorch reference. The pipeline does the rest
(writing, structure check, manifest) the same way for every flavor.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from . import onnx_export, optimized, validate
from .spec import ExportSpec
from .weights import WeightSource

# name -> (shape, ONNX data type) of every weight the saved graph must hold
ExpectedWeights = dict[str, tuple[tuple[int, ...], int]]


@dataclasses.dataclass(frozen=True)
class Flavor:
    name: str
    build: Callable[[WeightSource, ExportSpec], ir.Model]
    expected_weights: Callable[[ir.Model, ExportSpec], ExpectedWeights]
    check_numerics: Callable[..., dict]  # (model_path, source, spec, *, providers) -> validation figures


def _build_portable(source: WeightSource, spec: ExportSpec) -> ir.Model:
    model = onnx_export.trace(spec)
    onnx_export.attach_weights(model, source, spec.config, spec.dtype)
    return model


FLAVORS: dict[str, Flavor] = {
    "portable": Flavor("portable", _build_portable,
                       lambda model, spec: validate.portable_initializers(spec.config, spec.dtype),
                       validate.check_numerics),
    "optimized": Flavor("optimized", optimized.build,
                        lambda model, spec: onnx_export.initializer_layout(model),
                        validate.check_numerics_optimized),
}


def flavor(spec: ExportSpec) -> Flavor:
    return FLAVORS[spec.flavor]


def check_numerics(model_path: Path, source: WeightSource, spec: ExportSpec, *, providers: list[str]) -> dict:
    return flavor(spec).check_numerics(model_path, source, spec, providers=providers)
