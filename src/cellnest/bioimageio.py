"""BioImage Model Zoo (bioimage.io) packages of cellnest models.

``cellnest export-bioimageio MODEL --out DIR`` writes a model package in the current
model spec (0.5) that bioimage.io consumers load: ``rdf.yaml`` with inputs, outputs,
axes, preprocessing, test tensors, a cover, documentation (the model card), licence and
citations, and the weights three ways: TorchScript, ONNX, and the PyTorch state dict with
its architecture (:class:`ProbabilityNet`, importable from an installed cellnest).

What a package computes: ``(1, 3, H, W)`` raw image -> per-channel percentile scaling
(``scale_range``, 1st-99th percentile over the image) -> the network -> ``(1, 3, H, W)``
probabilities of background, cell interior and cell boundary. H and W are multiples of
the network's downsampling step (16), at least 64. Two steps of cellnest's own pipeline
are not in the package, and are documented in it: the percentiles are of all pixels
(cellnest uses the non-zero pixels; the two differ on images with much empty
background), and a size-normalised model expects cells of its training diameter (cellnest
resizes with ``--diameter``). Instances come from the probabilities by the model's
post-processing (``cellnest.postprocess``); bioimage.io tools show the probabilities.

Requires ``bioimageio.core`` (``pip install -e .[bioimageio]``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from cellnest.catalog import model_path
from cellnest.modelfile import ModelFile, NetworkSpec
from cellnest.targets import N_CLASSES

log = logging.getLogger(__name__)

CLASS_NAMES = ("background", "interior", "boundary")
TEST_SIDE = 256
MIN_SIDE = 64
CHALLENGE_PAPER = "https://arxiv.org/abs/2308.05864"
CHALLENGE_SITE = "https://neurips22-cellseg.grand-challenge.org/"
SEED_PAPERS = {
    "attn_unetpp": "Attention U-Net++: U-Net++ with attention gates for multi-modality cell segmentation "
                   "(NeurIPS 2022 Cell Segmentation Challenge)",
    "generic_unet": "Re-Unet: an nnU-Net generic U-Net with Ronneberger weight maps for multi-modality cell "
                    "segmentation (NeurIPS 2022 Cell Segmentation Challenge)",
}


class ProbabilityNet(nn.Module):
    """A cellnest network proper (no padding wrapper) followed by a softmax over classes:
    ``(B, 3, H, W)`` scaled image -> ``(B, 3, H, W)`` class probabilities, for H and W
    multiples of the network's step. The package's PyTorch architecture."""

    def __init__(self, name: str, cfg: dict, in_channels: int = 3, out_channels: int = N_CLASSES):
        super().__init__()
        self.net = NetworkSpec(name, dict(cfg), in_channels, out_channels).build().net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def _scale_range(image: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """bioimage.io's ``scale_range`` (1st and 99th percentile per channel over the image),
    so the test output is what a consumer computes from the test input."""
    lo = np.percentile(image, 1, axis=(2, 3), keepdims=True)
    hi = np.percentile(image, 99, axis=(2, 3), keepdims=True)
    return ((image - lo) / (hi - lo + eps)).astype(np.float32)


def export_package(model: str, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the bioimage.io package of ``model`` (shipped name, model file or run folder)
    into the folder ``out``; returns the path of its ``rdf.yaml``."""
    from bioimageio.spec import save_bioimageio_package_as_folder
    from bioimageio.spec.model import v0_5 as spec

    from cellnest.export import overlay_outlines
    from cellnest.io import OutputExistsError, write_png
    from cellnest.postprocess import probabilities_to_instances
    from cellnest.synthetic import SyntheticSpec, synthetic_cells, to_uint

    path = model_path(model)
    if path is None:
        raise ValueError("the classical baseline has no network to package; give a network model")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty; use --overwrite or another --out")
    found = ModelFile.load(path)
    network = found.build_network()
    if getattr(network, "tile", None):
        raise ValueError(f"{path}: {found.network.name} runs on fixed tiles; bioimage.io packaging supports the "
                         "convolutional networks (attn_unetpp, generic_unet, unet, unetpp)")
    step = network.multiple
    name = Path(model).stem if model not in ("attn-unetpp", "re-unet") and Path(model).exists() else model
    probability = ProbabilityNet(found.network.name, found.network.cfg, found.network.in_channels,
                                 found.network.out_channels).eval()
    probability.net.load_state_dict(network.net.state_dict())

    grey, _ = synthetic_cells(SyntheticSpec(shape=(TEST_SIDE, TEST_SIDE)), seed=0)
    test_input = np.repeat(to_uint(grey)[None, None].astype(np.float32), 3, axis=1)  # (1, 3, H, W) raw
    with torch.no_grad():
        test_output = probability(torch.from_numpy(_scale_range(test_input))).numpy()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.save(work / "test_input.npy", test_input)
        np.save(work / "test_output.npy", test_output)
        import tifffile  # the same tensors as images, for the zoo's previews

        tifffile.imwrite(work / "sample_input.tif", test_input[0].astype(np.uint8))
        tifffile.imwrite(work / "sample_output.tif", test_output[0])
        instances = probabilities_to_instances(test_output[0], found.postprocess)
        image = np.moveaxis(test_input[0], 0, -1)
        write_png(work / "cover.png", np.concatenate([overlay_outlines(image, np.zeros_like(instances)),
                                                      overlay_outlines(image, instances)], axis=1))
        torch.save({f"net.{k}": v for k, v in network.net.state_dict().items()}, work / "weights.pt")
        example = torch.from_numpy(_scale_range(test_input))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notes on shape-dependent Python branches
            torch.jit.trace(probability, example).save(str(work / "weights_torchscript.pt"))
            torch.onnx.export(probability, (example,), str(work / "weights.onnx"), dynamo=False, opset_version=17,
                              input_names=["raw"], output_names=["probabilities"],
                              dynamic_axes={"raw": {0: "batch", 2: "y", 3: "x"}, "probabilities": {0: "batch", 2: "y", 3: "x"}})
        (work / "README.md").write_text(_documentation(name, found, path, step))

        axes_in = [spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(f"c{i}") for i in range(3)]),
                   spec.SpaceInputAxis(id=spec.AxisId("y"), size=spec.ParameterizedSize(min=MIN_SIDE, step=step)),
                   spec.SpaceInputAxis(id=spec.AxisId("x"), size=spec.ParameterizedSize(min=MIN_SIDE, step=step))]
        axes_out = [spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(c) for c in CLASS_NAMES]),
                    spec.SpaceOutputAxis(id=spec.AxisId("y"), size=spec.SizeReference(tensor_id=spec.TensorId("raw"), axis_id=spec.AxisId("y"))),
                    spec.SpaceOutputAxis(id=spec.AxisId("x"), size=spec.SizeReference(tensor_id=spec.TensorId("raw"), axis_id=spec.AxisId("x")))]
        scaling = spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(
            axes=[spec.AxisId("y"), spec.AxisId("x")], min_percentile=found.targets.lower_percentile,
            max_percentile=found.targets.upper_percentile))
        torch_version = spec.Version(torch.__version__.split("+")[0])
        description = spec.ModelDescr(
            name=f"cellnest {name}",
            description=f"Cell instance segmentation of any microscopy modality (brightfield, fluorescence, phase contrast, "
                        f"DIC): 3-class probabilities from cellnest's {found.network.name} network.",
            authors=[spec.Author(name="cellnest developers")],
            cite=[spec.CiteEntry(text=SEED_PAPERS.get(found.network.name, "NeurIPS 2022 Cell Segmentation Challenge method"),
                                 url=CHALLENGE_SITE),
                  spec.CiteEntry(text="Ma et al., The Multi-modality Cell Segmentation Challenge: Towards Universal Solutions",
                                 url=CHALLENGE_PAPER)],
            license=spec.LicenseId("Apache-2.0"),
            documentation=spec.FileDescr(source=work / "README.md"),
            covers=[spec.FileDescr(source=work / "cover.png")],
            tags=["cell-segmentation", "instance-segmentation", "2d", "pytorch", "cellnest", "brightfield", "fluorescence",
                  "phase-contrast", "dic"],
            inputs=[spec.InputTensorDescr(id=spec.TensorId("raw"), axes=axes_in, test_tensor=spec.FileDescr(source=work / "test_input.npy"),
                                          sample_tensor=spec.FileDescr(source=work / "sample_input.tif"),
                                          preprocessing=[scaling],
                                          description="raw image, 3 channels (repeat a grey image three times)")],
            outputs=[spec.OutputTensorDescr(id=spec.TensorId("probabilities"), axes=axes_out,
                                            test_tensor=spec.FileDescr(source=work / "test_output.npy"),
                                            sample_tensor=spec.FileDescr(source=work / "sample_output.tif"),
                                            description="softmax probabilities of background, cell interior and cell boundary")],
            weights=spec.WeightsDescr(
                pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
                    source=work / "weights.pt", pytorch_version=torch_version,
                    architecture=spec.ArchitectureFromLibraryDescr(
                        import_from="cellnest.bioimageio", callable=spec.Identifier("ProbabilityNet"),
                        kwargs={"name": found.network.name, "cfg": dict(found.network.cfg),
                                "in_channels": found.network.in_channels, "out_channels": found.network.out_channels})),
                torchscript=spec.TorchscriptWeightsDescr(source=work / "weights_torchscript.pt", pytorch_version=torch_version,
                                                         parent="pytorch_state_dict"),
                onnx=spec.OnnxWeightsDescr(source=work / "weights.onnx", opset_version=17, parent="pytorch_state_dict"),
            ),
        )
        staged = work / "package"
        save_bioimageio_package_as_folder(description, output_path=staged)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(staged), out)  # a finished package or none: the folder appears whole
    return out / "rdf.yaml"


def _documentation(name: str, found: ModelFile, path: Path, step: int) -> str:
    card = path.with_suffix(".md")
    lines = [f"# cellnest {name}", "",
             "A cellnest model packaged for the BioImage Model Zoo. The package's network gives per-pixel "
             "probabilities of background, cell interior and cell boundary.", "",
             "## Use", "",
             f"* Input: a 2-D image with 3 channels (a grey image repeated three times), height and width multiples "
             f"of {step}, at least {MIN_SIDE}; each channel is scaled between its {found.targets.lower_percentile:g}th "
             f"and {found.targets.upper_percentile:g}th percentile (`scale_range`). cellnest takes the percentiles of "
             "the non-zero pixels; on images with much empty background the two differ.",
             "* Output: the 3-class probabilities. bioimage.io tools (bioimageio.core, ilastik, deepImageJ, the "
             "bioimage.io website) run this network and show these maps.",
             f"* Instances: cellnest decodes the probabilities into labelled cells with its post-processing "
             f"`{found.postprocess.to_dict()}` (`cellnest.postprocess.probabilities_to_instances`). The whole chain, "
             f"with cell-size rescaling and block-wise large images, is `cellnest segment IMAGES --out OUT --model {name}`.",
             ]
    if found.cell_diameter:
        lines.append(f"* Cell size: trained with every image resized to cells of {found.cell_diameter:g} px diameter; "
                     "resize your images to about that size first (cellnest does this with `--diameter auto`).")
    lines += ["", "## Training data and licences", "",
              "Trained by cellnest on public labelled microscopy images (the NeurIPS 2022 Cell Segmentation "
              "Challenge's sources); each source keeps its own licence, listed in the model card below. The package "
              "is released under Apache-2.0, as cellnest.", ""]
    lines += ["## Validation", "",
              "`bioimageio test` runs the package on its test tensors with each weight format (TorchScript, ONNX, "
              "PyTorch state dict) at several sizes; cellnest's test suite does so for every shipped model. The "
              "accuracy of the full cellnest chain (challenge F1 per modality) is in the model card below.", ""]
    if card.is_file():
        lines += ["## Model card", "", card.read_text().replace("\n# ", "\n### ")]
    return "\n".join(lines) + "\n"
