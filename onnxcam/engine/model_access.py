"""What methods that run the model again reach: one batch's preprocessed model input,
the target scores of masked inputs (Score-CAM) and the input gradients at moved
inputs (SmoothGrad, integrated gradients).

Everything runs through the bundle cut at its model input, built on first use, so
methods that never call these cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import numpy as np

from onnxcam.bundle import (
    INPUT_IMAGE,
    INPUT_TARGET,
    INPUT_TARGET_WEIGHTS,
    OUTPUT_INPUT_GRADIENTS,
    OUTPUT_LOGITS,
)
from onnxcam.engine.sessions import Sessions
from onnxcam.layout import Layout

SCORE_BATCH = 32  # masked inputs per run of the back half (Score-CAM)
GRADIENT_BATCH = 32  # model inputs per run of the split-off gradient graph

# Masks for image n's channels [start, stop): float32 [stop - start, H, W] in [0, 1].
MaskMaker = Callable[[int, int, int], np.ndarray]


class ModelAccess:
    """The model behind one prepared uint8 batch [N, H, W, C]."""

    def __init__(self, sessions: Sessions, batch: np.ndarray,
                 progress: Callable[[float], None] | None = None) -> None:
        self._sessions = sessions
        self._batch = batch
        # Told the share of one image done, for methods that take minutes per image.
        self._progress = progress or (lambda share: None)
        self.info = sessions.info
        self.layout = Layout.of(sessions.info.layout)

    @cached_property
    def model_input(self) -> np.ndarray:
        """The batch as the model reads it: preprocessed float32, in the model's layout."""
        front, _ = self._sessions.split((OUTPUT_LOGITS,))
        (model_input,) = front.run(None, {INPUT_IMAGE: np.ascontiguousarray(self._batch)})
        return np.asarray(model_input, np.float32)

    def model_input_nhwc(self) -> np.ndarray:
        return self.layout.to_nhwc(self.model_input)

    def masked_scores(self, masks: MaskMaker, count: int, targets: np.ndarray,
                      seeds: np.ndarray | None = None) -> np.ndarray:
        """Target scores [N, K] of the model input times each of K = ``count`` masks:
        the logit of the row's class, or with ``seeds`` the row's weighting of the logits.

        Masks are asked for ``SCORE_BATCH`` at a time, so memory holds one chunk of
        masked inputs whatever K and the batch size are (ResNet50's 2048 channels at
        224² would be 1.2 GB per image at once).
        """
        _, back = self._sessions.split((OUTPUT_LOGITS,))
        scores = np.zeros((len(self._batch), count), np.float32)
        axis = self.layout.channel_axis
        for n, image in enumerate(self.model_input):
            for start in range(0, count, SCORE_BATCH):
                stop = min(start + SCORE_BATCH, count)
                masked = np.ascontiguousarray(
                    image[None] * np.expand_dims(masks(n, start, stop), axis), np.float32)
                (logits,) = back.run([OUTPUT_LOGITS], {self.info.model_input: masked})
                scores[n, start:stop] = (logits[:, targets[n]] if seeds is None else
                                         (logits * seeds[n]).reshape(len(logits), -1).sum(1))
                self._progress((stop - start) / count)
        return scores

    def gradients_at(self, model_inputs: np.ndarray, target: int,
                     seed: np.ndarray | None = None) -> np.ndarray:
        """Input gradients NHWC [M, H, W, C] at ``model_inputs`` (the model's layout), all
        of class ``target``, or of the weighting ``seed`` of the logits when given."""
        _, back = self._sessions.split((OUTPUT_INPUT_GRADIENTS,))
        chunks = []
        for start in range(0, len(model_inputs), GRADIENT_BATCH):
            chunk = np.ascontiguousarray(model_inputs[start : start + GRADIENT_BATCH],
                                         np.float32)
            feeds = {self.info.model_input: chunk,
                     INPUT_TARGET: np.full(len(chunk), target, np.int64)}
            if seed is not None:
                feeds[INPUT_TARGET_WEIGHTS] = np.repeat(seed[None], len(chunk), axis=0)
            (gradients,) = back.run([OUTPUT_INPUT_GRADIENTS], feeds)
            chunks.append(gradients)
        return np.concatenate(chunks)
