"""The onnxruntime sessions one bundle runs on: the cache by output set, the pruned
graphs, the split at the model input, and IO binding on CUDA.

onnxruntime runs every node of a graph whatever outputs are asked for, so a call
that needs no whole-network gradient gets a session pruned of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcam.bundle import (
    DECODED_OUTPUTS,
    INPUT_IMAGE,
    INPUT_TARGET,
    OUTPUT_LOGITS,
    SEED,
    BundleInfo,
    Level,
    crop_gradients,
    crop_inputs,
    is_activation_output,
    read_bundle,
)
from onnxcam.errors import BundleError
from onnxcam.graph import prune_unused
from onnxcam.head_cut import extract, head_boundary, split_at_layers, target_outputs
from onnxcam.runtime import make_session, out_of_memory, run_in_chunks

log = logging.getLogger(__name__)


def keep_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``model`` with only the outputs ``names`` and the nodes they need, in place.

    MaxPool's optional indices output goes too when nothing reads it any more, since
    onnxruntime computes every output a node declares.
    """
    graph = model.graph
    kept = [output for output in graph.output if output.name in names]
    del graph.output[:]
    graph.output.extend(kept)
    prune_unused(graph)
    read = {name for node in graph.node for name in node.input} | set(names)
    for node in graph.node:
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1] not in read:
            del node.output[1:]
    return model


def split_at_model_input(
    model: onnx.ModelProto, info: BundleInfo, outputs: tuple[str, ...] = (OUTPUT_LOGITS,)
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Two models cut from a bundle at its preprocessed model input.

    The first maps ``image`` to that float tensor; the second maps the float tensor
    (and ``target`` and ``target_weights``, when a gradient is among ``outputs``) to
    ``outputs``. Score-CAM masks the model's own input and SmoothGrad adds noise to
    it, so they need both.
    """
    if not info.model_input:
        raise BundleError("this bundle does not record its model input (re-export it)")
    front = extract(model, {}, [info.model_input])
    back = extract(model, {info.model_input: onnx.TensorProto.FLOAT}, list(outputs))
    return front, back


# onnxruntime's names of the element types a forward pass may hand the backward one.
ELEMENT_TYPES = {"tensor(float)": onnx.TensorProto.FLOAT, "tensor(double)": onnx.TensorProto.DOUBLE,
                 "tensor(int64)": onnx.TensorProto.INT64, "tensor(int32)": onnx.TensorProto.INT32,
                 "tensor(bool)": onnx.TensorProto.BOOL, "tensor(uint8)": onnx.TensorProto.UINT8}


@dataclass(frozen=True)
class SeedCut:
    """A bundle cut at its seed: ``forward`` maps ``image`` to the logits, the decoded
    detections, the activations and ``boundary``, every tensor the backward pass reads;
    ``backward`` maps ``boundary`` and ``SEED`` to the target outputs (``target_outputs``)."""

    forward: Any
    backward: Any
    boundary: tuple[str, ...]
    targets: tuple[str, ...]


def cut_at_seed(model: onnx.ModelProto, make: Callable[[onnx.ModelProto], Any]
                ) -> SeedCut | None:
    """``model`` cut between its forward pass and its backward pass, sessions made by
    ``make``; None where the backward pass reads anything but forward tensors and the
    seed (the image, the target), or hands over a type this does not know. Exact:
    the same nodes on the same tensors. Graph must be sorted."""
    graph = model.graph
    names = [o.name for o in graph.output]
    boundary = tuple(name for name in head_boundary(graph, []) if name != SEED)
    given = [OUTPUT_LOGITS, *(n for n in names if n in DECODED_OUTPUTS or is_activation_output(n))]
    forward = extract(model, {}, dict.fromkeys([*given, *boundary]))
    if [i.name for i in forward.graph.input] != [INPUT_IMAGE]:
        return None
    forward_session = make(forward)
    types = {o.name: ELEMENT_TYPES.get(o.type) for o in forward_session.get_outputs()}
    if any(types[name] is None for name in boundary):
        return None
    targets = tuple(target_outputs(graph))
    backward = extract(model, {SEED: onnx.TensorProto.FLOAT,
                               **{name: int(types[name] or 0) for name in boundary}}, targets)
    if len(backward.graph.input) != len(boundary) + 1:
        return None
    return SeedCut(forward_session, make(backward), boundary, targets)


class FixedBatchSession:
    """An onnxruntime session of a fixed-batch graph, run in chunks of that batch."""

    def __init__(self, session: Any, size: int) -> None:
        self._session = session
        self.size = size

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        wanted = names or [output.name for output in self._session.get_outputs()]
        return run_in_chunks(self._session.run, wanted, feeds, self.size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class Sessions:
    """Every session of one bundle, built lazily and kept for the process's life.

    ``source`` is the bundle's path or bytes, already checked by ``read_bundle``; a
    path is read again only when a pruned or split graph is first needed, so the
    bundle's bytes are not held meanwhile.
    """

    def __init__(self, source: str | Path | bytes, data: bytes, info: BundleInfo,
                 device: str = "auto", threads: int | None = None, arena: bool = True) -> None:
        self._source = source
        self.info = info
        self.threads = threads
        self.arena = arena
        name = "bundle" if isinstance(source, bytes) else str(source)
        try:
            session, self.device = make_session(data, device, threads, arena)
        except Exception as exc:
            if out_of_memory(exc):  # the process's ceiling, not the bundle's fault
                raise MemoryError(f"{name}: onnxruntime ran out of memory loading it") from exc
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BundleError(f"{name}: not an onnxcam bundle (onnxruntime cannot load it: "
                              f"{first_line})") from exc
        # IO binding saves the host copies of intermediate buffers on CUDA; on the CPU
        # it gains nothing, but it can be switched on to test the path.
        self.use_io_binding = self.device == "cuda"
        self._outputs = [output.name for output in session.get_outputs()]
        # Sessions by the whole-network gradient outputs they keep. A bundle with them
        # gives its full session up: most calls need neither backward pass, and
        # holding both graphs would double the memory; it is rebuilt when asked for.
        self._by_kept: dict[frozenset[str], Any] = {}
        if not info.input_gradients:
            self._by_kept[frozenset()] = session
        self._splits: dict[tuple[str, ...], tuple[Any, Any]] = {}
        self._at_layers: tuple[Any, Any] | None = None
        self._local: dict[int, Any] = {}
        self._forward: dict[tuple[str, ...], Any] = {}
        self._at_seed: list[SeedCut | None] = []
        if info.batch_size:
            log.info("%s runs at batch size %d only: images go through it in chunks of %d, "
                     "the last one padded", name, info.batch_size, info.batch_size)

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs ``names`` for ``feeds``, from the smallest session that has them
        (a fixed-batch bundle's in chunks of its batch size)."""
        if self.info.batch_size:
            return run_in_chunks(self._run_once, names, feeds, self.info.batch_size)
        return self._run_once(names, feeds)

    def _run_once(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = self.session_for(names)
        if not self.use_io_binding:
            return list(session.run(names, feeds))
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

    def session_for(self, names: list[str]) -> Any:
        """A session that computes ``names``, pruned of the whole-network gradients
        nobody asked for."""
        kept = frozenset(self.info.input_gradients) & frozenset(names)
        if kept not in self._by_kept:
            dropped = set(self.info.input_gradients) - kept
            log.debug("building a session without %s", ", ".join(sorted(dropped)) or "nothing")
            model = keep_outputs(self._model(),
                                 [name for name in self._outputs if name not in dropped])
            self._by_kept[kept] = self._make(model)
        return self._by_kept[kept]

    def split(self, outputs: tuple[str, ...]) -> tuple[Any, Any]:
        """Sessions for the bundle cut at its model input (``split_at_model_input``),
        built once per set of back-half outputs."""
        if outputs not in self._splits:
            log.debug("splitting the bundle at %s for %s", self.info.model_input, outputs)
            front, back = split_at_model_input(self._model(), self.info, outputs)
            self._splits[outputs] = (self._chunked(self._make(front)),
                                     self._chunked(self._make(back)))
        return self._splits[outputs]

    @property
    def can_cut(self) -> bool:
        """Whether many targets per image can run the trunk once (``cut``)."""
        return bool(self.info.head_inputs) and not self.info.batch_size

    def cut(self) -> tuple[Any, Any]:
        """Sessions for the bundle cut at its layers (``head_cut.split_at_layers``):
        the trunk and the part after the layers, built once."""
        if self._at_layers is None:
            log.debug("cutting the bundle at its layers for many targets per image")
            trunk, head = split_at_layers(self._model(), self.info.head_inputs)
            self._at_layers = (self._make(trunk), self._make(head))
        return self._at_layers

    def local(self, level: Level) -> Any:
        """The local head of a detector's ``level`` (``Level``), built once."""
        if level.layer not in self._local:
            inputs = crop_inputs(level.layer)
            model = extract(self._model(), dict.fromkeys(inputs, onnx.TensorProto.FLOAT),
                            [crop_gradients(level.layer)])
            self._local[level.layer] = self._make(model)
        return self._local[level.layer]

    def at_seed(self) -> SeedCut | None:
        """The bundle cut between its forward and backward passes (``cut_at_seed``),
        built once; None where it cannot be."""
        if not self._at_seed:
            log.debug("cutting the bundle at its seed for many detections per image")
            try:
                cut = cut_at_seed(self._model(), self._make)
            except BundleError:
                cut = None
            if cut is None:
                log.info("the bundle cannot be cut at its seed: each detection runs the "
                         "whole bundle")
            self._at_seed.append(cut)
        return self._at_seed[0]

    def forward(self, names: list[str], image: np.ndarray) -> list[np.ndarray]:
        """The forward outputs ``names`` for one image, from a session kept to the
        forward pass: a detector's decoding run needs no gradients, and an image
        without proposals has none its backward pass can size."""
        key = tuple(names)
        if key not in self._forward:
            model = keep_outputs(self._model(), names)
            read = {i for node in model.graph.node for i in node.input}
            for unread in [i for i in model.graph.input if i.name not in read]:
                model.graph.input.remove(unread)  # target_weights: its default is gone
            self._forward[key] = self._make(model)
        session = self._forward[key]
        feeds = {INPUT_IMAGE: image[None], INPUT_TARGET: np.full(1, -1, np.int64)}
        wanted = {i.name for i in session.get_inputs()}
        return list(session.run(names, {k: v for k, v in feeds.items() if k in wanted}))

    def _model(self) -> onnx.ModelProto:
        data = self._source if isinstance(self._source, bytes) else read_bundle(self._source).data
        return onnx.load_from_string(data)

    def _chunked(self, session: Any) -> Any:
        """``session`` itself, or for a fixed-batch bundle a wrapper that runs it in
        chunks of that batch (Score-CAM and SmoothGrad run the halves directly)."""
        return FixedBatchSession(session, self.info.batch_size) if self.info.batch_size \
            else session

    def _make(self, model: onnx.ModelProto) -> Any:
        return make_session(model.SerializeToString(), self.device, self.threads,
                            self.arena)[0]
