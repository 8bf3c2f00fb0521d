"""A patch-level CLIP scan gate: the safety prompt against a grid of crops (and the whole image).

Plain CLIP sees a downscaled whole image, so a small unsafe region in a large benign picture
barely moves the cosine. Scoring each cell of a ``grid x grid`` split as well (each crop is
resized to CLIP's input, so the region fills more of it) and taking the max catches it; the idea
GuardAlign builds on. All crops of all requests go through one batched CLIP call
(``batch_size`` images per forward). Cost: ``grid**2 + 1`` image forwards per image instead of 1
(docs/evaluators.md has the measurement). Cosines of crops are distributed differently from
whole images: calibrate ``threshold`` (``eta-guard calibrate``) before relying on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eta_guard.config import DEFAULT_SAFETY_PROMPT
from eta_guard.errors import InvalidInputError
from eta_guard.evaluators.base import GuardRequest, GuardScore

if TYPE_CHECKING:
    from PIL import Image

    from eta_guard.evaluators.clip import CLIPPreEvaluator


def grid_crops(image: Image.Image, grid: int) -> list[Image.Image]:
    """``grid * grid`` crops covering ``image`` row by row (edges absorb the remainder)."""
    width, height = image.size
    xs = [round(i * width / grid) for i in range(grid + 1)]
    ys = [round(j * height / grid) for j in range(grid + 1)]
    return [
        image.crop((xs[i], ys[j], xs[i + 1], ys[j + 1]))
        for j in range(grid)
        for i in range(grid)
        if xs[i + 1] > xs[i] and ys[j + 1] > ys[j]
    ]


class PatchCLIPGate:
    """Max CLIP cosine over the whole image and its grid crops (unsafe iff >= ``threshold``).

    Args:
        clip: A loaded :class:`~eta_guard.evaluators.clip.CLIPPreEvaluator` (shared with ETA's
            CLIP check and best-of-N term: no second copy of the model).
        grid: Cells per side (2: 4 crops, 3: 9 crops).
        include_whole: Score the whole image too. Set False when this gate runs beside ETA's
            own CLIP check, which already scores the whole image.
        threshold: Cosine at or above which the request is flagged (paper's CLIP value by
            default; crops need their own calibration).
        prompt: The unsafe-content prompt.
        batch_size: Images per CLIP forward.
    """

    def __init__(
        self,
        clip: CLIPPreEvaluator,
        *,
        grid: int = 3,
        include_whole: bool = True,
        threshold: float = 0.16,
        prompt: str = DEFAULT_SAFETY_PROMPT,
        batch_size: int = 32,
        name: str = "patch_clip",
    ) -> None:
        if not isinstance(grid, int) or not 1 <= grid <= 8:
            raise InvalidInputError(f"grid={grid!r} must be an int from 1 to 8 (cells per side)")
        if grid == 1 and not include_whole:
            raise InvalidInputError("grid=1 with include_whole=False scores nothing")
        if batch_size < 1:
            raise InvalidInputError(f"batch_size={batch_size!r} must be >= 1")
        self.clip, self.grid, self.include_whole = clip, grid, include_whole
        self.threshold, self.prompt, self.batch_size = threshold, prompt, batch_size
        self.name = name

    #: Requests this gate reads (see eta_guard.evaluators.base.GateEvaluator).
    applies_to = frozenset({"images"})

    def views(self, image: Image.Image) -> list[Image.Image]:
        """What is scored for one image: the whole (if on), then the grid crops."""
        crops = grid_crops(image, self.grid) if self.grid > 1 else []
        return [image, *crops] if self.include_whole else crops

    def check(self, requests: list[GuardRequest]) -> list[GuardScore]:
        """One batched CLIP call over every view of every image; per-request max."""
        counts, flat = [], []
        for request in requests:
            views = [v for image in request.images for v in self.views(image)]
            counts.append(len(views))
            flat.extend(views)
        scores = (
            self.clip.score_images(flat, prompt=self.prompt, batch_size=self.batch_size)
            if flat
            else []
        )
        out, offset = [], 0
        for n in counts:
            if n == 0:
                raise InvalidInputError("the patch CLIP scan was given a request without images")
            out.append(GuardScore(max(scores[offset : offset + n])))
            offset += n
        return out
