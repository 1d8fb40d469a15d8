"""What methods that run the model again reach: one batch's preprocessed model input,
the target scores of masked inputs (Score-CAM) and the input gradients at moved
inputs (SmoothGrad, integrated gradients).

Everything runs through the bundle cut at its model input, built on first use, so
methods that never call these cost nothing.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from onnxcam.bundle import INPUT_IMAGE, INPUT_TARGET, OUTPUT_INPUT_GRADIENTS, OUTPUT_LOGITS
from onnxcam.layout import Layout
from onnxcam.worker.sessions import Sessions

SCORE_BATCH = 32  # masked inputs per run of the back half (Score-CAM)
GRADIENT_BATCH = 32  # model inputs per run of the split-off gradient graph


class ModelAccess:
    """The model behind one prepared uint8 batch [N, H, W, C]."""

    def __init__(self, sessions: Sessions, batch: np.ndarray) -> None:
        self._sessions = sessions
        self._batch = batch
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

    def masked_scores(self, masks: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Target logits [N, K] of the model input times each of K masks [N, K, H, W]
        in [0, 1] at input resolution."""
        _, back = self._sessions.split((OUTPUT_LOGITS,))
        scores = np.zeros(masks.shape[:2], np.float32)
        for n, image in enumerate(self.model_input):
            masked = image[None] * np.expand_dims(masks[n], self.layout.channel_axis)
            for start in range(0, len(masked), SCORE_BATCH):
                chunk = np.ascontiguousarray(masked[start : start + SCORE_BATCH], np.float32)
                (logits,) = back.run([OUTPUT_LOGITS], {self.info.model_input: chunk})
                scores[n, start : start + len(chunk)] = logits[:, targets[n]]
        return scores

    def gradients_at(self, model_inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Input gradients NHWC [M, H, W, C] at ``model_inputs`` (the model's layout),
        each for its own target."""
        _, back = self._sessions.split((OUTPUT_INPUT_GRADIENTS,))
        chunks = []
        for start in range(0, len(model_inputs), GRADIENT_BATCH):
            feeds = {self.info.model_input: np.ascontiguousarray(
                         model_inputs[start : start + GRADIENT_BATCH], np.float32),
                     INPUT_TARGET: np.asarray(targets[start : start + GRADIENT_BATCH], np.int64)}
            (gradients,) = back.run([OUTPUT_INPUT_GRADIENTS], feeds)
            chunks.append(gradients)
        return np.concatenate(chunks)
