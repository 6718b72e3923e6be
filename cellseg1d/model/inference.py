"""CellSeg1 inference: SAM automatic mask generation for cells, to an instance label image.

The pipeline (defaults from the CellSeg1 paper; see :class:`InferenceSettings`):

1. Crops: the whole image plus the 2 x 2 overlapping crops of crop layer 1
   (:func:`cellseg1d.model.prompts.crop_boxes`). Each crop is resized so its
   longest side is ``image_size`` with PIL's bilinear filter (what
   segment-anything's ``ResizeLongestSide.apply_image`` does, and so the
   CellSeg1 reference), normalised with SAM's pixel mean/std and padded at
   the bottom/right to the model's square input (``Sam.preprocess``).
2. Per crop: the image embedding once; a ``points_per_side**2`` grid of
   foreground points in batches of ``points_per_batch``, one mask per point
   (``multimask_output=False``). The mask decoder runs in two stages
   (:func:`decode_scores`, :func:`decode_masks`): prompt encoder, two-way
   transformer (its prompt-independent image side computed once per crop,
   not per prompt) and IoU head for every prompt; the upscaling of the image
   tokens and the hypernetwork (the mask logits, (K, 1, 4G, 4G), 128 x 128 at
   input 512) only for prompts whose IoU-head score is >= ``pred_iou_thresh``.
3. Filters, in this order (all are per-mask tests, so the order does not
   change the result, only the cost):

   * IoU-head score > ``pred_iou_thresh`` (strictly; no test when it is 0):
     decided before any mask exists;
   * the survivors' low-resolution logits are upsampled exactly as SAM does
     (``Sam.postprocess_masks``: to the padded input, unpad, to the crop
     size) and the stability score is computed on these crop-resolution
     logits, as specified (the IoU between the masks thresholded at
     ``+offset`` and ``-offset``; 0 for an empty mask), kept if
     >= ``stability_score_thresh``; it is not computed on the low-resolution
     logits, which would only approximate it (no test when the threshold is 0);
   * binarised at ``Sam.mask_threshold``; non-empty; area < ``max_area_fraction``
     of the whole image; bounding box not within ``crop_edge_margin`` pixels
     of a crop edge that is not also an image edge, the box's ends taken
     inclusive (its last row and column), as segment-anything's
     ``is_box_near_crop_edge`` does.

   ``upsample_all=True`` runs the reference order instead (logits for every
   prompt, all upsampled, then the filters); the tests check that both keep
   the same masks.
4. Mask-IoU NMS (:mod:`cellseg1d.model.nms`) within each crop (score: IoU-head
   score, threshold ``crop_nms_thresh``, as the reference), then across crops
   in the image frame (score: IoU-head score x stability, threshold
   ``crop_nms_thresh``). With ``box_gate`` (the reference's rule) only masks
   whose bounding boxes share at least two rows and two columns are
   compared. Every NMS keeps the survivors in rank order (ties: earlier
   first), and that order carries on to the next stage.
5. Holes and islands smaller than ``min_region_area`` pixels are removed
   (:mod:`cellseg1d.model.postprocess`; skipped when it is 0), then NMS
   again at ``max(nms_thresh, crop_nms_thresh)``. ``cleanup_nms="reference"``:
   masks that needed no clean-up rank first (a 0/1 score, ties in order), the
   IoU is that of the masks *before* clean-up and the box gate uses the boxes
   after it, as the reference computes it; ``"cleaned"``: the IoU of the
   cleaned masks, ties broken by IoU-head score x stability. Then the area
   limit again.
6. Label image (:func:`cellseg1d.model.postprocess.paint_labels`): masks
   painted largest first (ties: the order of step 5) so smaller ones win,
   each clearing its area and painting its largest 4-connected component
   (``paint="reference"``; or ``"largest_piece"``), labels 1..N (uint32).

Candidate masks are kept as binary (1 byte/pixel) tensors on the device:
mask NMS needs full-resolution masks to be exact, and binary masks are a
quarter of the size of the float logits they come from.

Shapes: image (H, W, 3) uint8; crop (h, w); model input S x S (S = the
model's ``image_encoder.img_size``), embedding (1, 256, S/16, S/16).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.modeling import Sam

from cellseg1d.errors import CellsegError
from cellseg1d.model import nms as nms_ops
from cellseg1d.model.fastdecode import SharedImage, shared_image, two_way_transformer
from cellseg1d.model.postprocess import PAINT_MODES, paint_labels, remove_small_regions
from cellseg1d.model.profiles import PRECISIONS
from cellseg1d.model.prompts import CropBox, crop_boxes, point_grid, points_in_crop, resized_shape

log = logging.getLogger(__name__)

#: Ways to run the NMS after the hole/island clean-up (see :class:`InferenceSettings`).
CLEANUP_NMS_MODES = ("reference", "cleaned")


@dataclass
class InferenceSettings:
    """Parameters of CellSeg1 automatic segmentation (paper defaults)."""

    #: Points per side of the prompt grid, in every crop.
    points_per_side: int = 32
    #: Prompts decoded together.
    points_per_batch: int = 64
    #: Prompts through the decoder's transformer at once, within each batch (results do not depend on it;
    #: at least 2, see :func:`sub_batches`); None: by device (:func:`default_decode_batch`: 8 on the CPU,
    #: where smaller temporaries stay in cache and avoid page faults).
    decode_batch: int | None = None
    #: 0: whole image only; 1: also 2 x 2 crops; n: also the 2**i x 2**i crops of layers i <= n.
    crop_n_layers: int = 1
    #: Overlap of layer-1 crops as a fraction of the shorter image side.
    crop_overlap_ratio: float = 512 / 1500
    #: Minimum IoU-head score of a kept mask.
    pred_iou_thresh: float = 0.8
    #: Minimum stability score of a kept mask.
    stability_score_thresh: float = 0.6
    #: Logit offset of the stability score.
    stability_score_offset: float = 0.8
    #: Masks must be smaller than this fraction of the whole image.
    max_area_fraction: float = 0.1
    #: The reference's ``box_nms_thresh``: used only by the NMS after clean-up, as the larger of the two.
    nms_thresh: float = 0.05
    #: Mask-IoU NMS threshold within each crop and across crops (and after clean-up: the larger of the two).
    crop_nms_thresh: float = 0.05
    #: Holes and islands smaller than this (pixels) are removed; 0 disables.
    min_region_area: int = 20
    #: Longest side of each crop at the model input (<= the model's input size).
    image_size: int = 512
    #: A box coordinate this close (pixels) to a crop edge that is not an image edge drops the mask.
    crop_edge_margin: float = 20.0
    #: Masks per block of the mask-IoU matrix product; None: by device (nms.default_chunk).
    nms_chunk: int | None = None
    #: Approximation (off in the paper): decode the grid coarse to fine and skip a point that lies
    #: inside a mask already accepted (this crop or an earlier one). See :func:`coarse_to_fine`.
    skip_covered_points: bool = False
    #: Mask NMS compares only masks whose boxes share >= 2 rows and >= 2 columns (the reference's
    #: overlap test on inclusive boxes); False: every pair by its mask IoU.
    box_gate: bool = True
    #: The NMS after clean-up: "reference" (IoU before clean-up, unchanged masks first, ties in
    #: order) or "cleaned" (IoU of the cleaned masks, ties by IoU-head score x stability).
    cleanup_nms: str = "reference"
    #: Painting the label image: "reference" or "largest_piece" (see postprocess.paint_labels).
    paint: str = "reference"
    #: Precision of the image encoder: "fp32" (the reference), "bf16" or "fp16" (autocast), or "auto":
    #: bf16 where the hardware has it (CUDA with bf16, CPUs with AMX or AVX512-BF16), else fp32.
    encoder_precision: str = "fp32"
    #: Precision of the mask decoder, as ``encoder_precision``; "auto" is bf16 on CUDA only (on a CPU the
    #: decoder is bound by memory traffic, and bf16 was measured no faster there: docs/engine.md).
    decoder_precision: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("encoder_precision", "decoder_precision"):
            if getattr(self, name) not in PRECISIONS:
                raise ValueError(f"{name} must be one of {', '.join(PRECISIONS)}, got {getattr(self, name)!r}")
        if self.cleanup_nms not in CLEANUP_NMS_MODES:
            raise ValueError(f"cleanup_nms must be one of {', '.join(CLEANUP_NMS_MODES)}, got {self.cleanup_nms!r}")
        if self.paint not in PAINT_MODES:
            raise ValueError(f"paint must be one of {', '.join(PAINT_MODES)}, got {self.paint!r}")


@dataclass
class InferenceReport:
    """Where the time went and how many masks survived each stage (filled by :func:`segment_image`)."""

    #: Seconds per stage (summed over crops): embed, decode (transformer + IoU head),
    #: mask_decode (mask logits of the kept prompts), filter, nms, postprocess.
    seconds: dict[str, float] = field(default_factory=dict)
    #: Mask counts: prompts, decoded (prompts not skipped), iou, filters, crop_nms, cross_nms,
    #: cleanup_nms, labels.
    counts: dict[str, int] = field(default_factory=dict)

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def add_count(self, stage: str, n: int) -> None:
        self.counts[stage] = self.counts.get(stage, 0) + int(n)


@dataclass
class Candidates:
    """Masks that passed the filters, with their scores. Masks are in one frame (crop or image)."""

    masks: torch.Tensor  # (N, h, w) bool
    iou_pred: torch.Tensor  # (N,) float32
    stability: torch.Tensor  # (N,) float32
    boxes: torch.Tensor  # (N, 4) int64 (x0, y0, x1, y1), exclusive ends, in the masks' frame

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def select(self, index: torch.Tensor) -> Candidates:
        return Candidates(self.masks[index], self.iou_pred[index], self.stability[index], self.boxes[index])

    @staticmethod
    def empty(shape: tuple[int, int], device: torch.device) -> Candidates:
        return Candidates(
            torch.zeros((0, *shape), dtype=torch.bool, device=device),
            torch.zeros(0, dtype=torch.float32, device=device),
            torch.zeros(0, dtype=torch.float32, device=device),
            torch.zeros((0, 4), dtype=torch.int64, device=device),
        )

    @staticmethod
    def cat(parts: list[Candidates], shape: tuple[int, int], device: torch.device) -> Candidates:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Candidates.empty(shape, device)
        return Candidates(
            torch.cat([p.masks for p in parts]),
            torch.cat([p.iou_pred for p in parts]),
            torch.cat([p.stability for p in parts]),
            torch.cat([p.boxes for p in parts]),
        )


class _Clock:
    """Stage timer that adds to an optional report (synchronising CUDA so times are real)."""

    def __init__(self, report: InferenceReport | None, device: torch.device) -> None:
        self.report = report
        self.sync = report is not None and device.type == "cuda"

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.report is None:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.report.add_time(name, time.perf_counter() - start)

    def count(self, name: str, n: int) -> None:
        if self.report is not None:
            self.report.add_count(name, n)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from (H, W), (H, W, 1) or (H, W, 3) uint8; ValueError otherwise."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """(N,) IoU of ``logits > t + offset`` and ``logits > t - offset`` for logits (N, h, w); 0 if empty.

    The first mask is contained in the second, so the IoU is a ratio of pixel counts.
    """
    high = (logits > mask_threshold + offset).flatten(1).sum(dim=1)
    low = (logits > mask_threshold - offset).flatten(1).sum(dim=1)
    ratio = high.to(torch.float32) / low.clamp(min=1).to(torch.float32)
    return torch.where(low > 0, ratio, torch.zeros_like(ratio))


def near_crop_edge(boxes: torch.Tensor, crop: CropBox, image_hw: tuple[int, int], margin: float) -> torch.Tensor:
    """(N,) bool: a box (crop frame) has a side within ``margin`` of a crop edge that is not an image edge.

    ``boxes`` have exclusive ends; the test uses the last row and column of
    the box (inclusive ends, segment-anything's ``batched_mask_to_box``)
    against the crop's ``(x0, y0, x1, y1)``, as ``is_box_near_crop_edge``.
    """
    height, width = image_hw
    offset = torch.tensor([crop.x0, crop.y0, crop.x0 - 1, crop.y0 - 1], device=boxes.device)
    absolute = (boxes + offset).to(torch.float32)  # (N, 4) image frame, inclusive ends
    crop_t = torch.tensor(crop.as_tuple(), dtype=torch.float32, device=boxes.device)
    image_t = torch.tensor([0, 0, width, height], dtype=torch.float32, device=boxes.device)
    at_crop = (absolute - crop_t).abs() <= margin
    at_image = (absolute - image_t).abs() <= margin
    return (at_crop & ~at_image).any(dim=1)


def resize_crop(region: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """A uint8 (h, w, 3) crop resized to ``new_hw`` with PIL's bilinear filter (uint8 (h', w', 3)).

    This is what segment-anything's ``ResizeLongestSide.apply_image`` does
    (through torchvision's PIL path), so the pixels equal the reference's.
    """
    if tuple(region.shape[:2]) == tuple(new_hw):
        return region
    resized = Image.fromarray(np.ascontiguousarray(region)).resize((new_hw[1], new_hw[0]), Image.Resampling.BILINEAR)
    return np.array(resized)  # writable (torch.from_numpy needs it)


def _model_input(sam: Sam, image_t: torch.Tensor, crop: CropBox, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The crop as the model's input (1, 3, S, S) float32, and its size (h', w') before padding."""
    region = image_t[:, crop.y0 : crop.y1, crop.x0 : crop.x1]  # (3, h, w) uint8
    new_hw = resized_shape(crop.height, crop.width, image_size)
    if new_hw != (crop.height, crop.width):
        pixels = resize_crop(region.permute(1, 2, 0).cpu().numpy(), new_hw)  # (h', w', 3) uint8
        region = torch.from_numpy(pixels).to(image_t.device).permute(2, 0, 1)
    x = region[None].to(torch.float32)  # (1, 3, h', w')
    return sam.preprocess(x), new_hw


def native_bf16(device: torch.device) -> bool:
    """True where bfloat16 matrix products are native: CUDA devices that support it, CPUs with AMX/AVX512-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability().upper()
        if "AVX512" not in capability:
            return False
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
                flags = info.read(200_000)
        except OSError:
            return False
        return "amx_bf16" in flags or "avx512_bf16" in flags
    return False


def precision_dtype(precision: str, device: torch.device, stage: str = "encoder") -> torch.dtype | None:
    """The autocast dtype of a precision setting on ``device`` (None: float32); ``stage`` "encoder" or "decoder".

    "auto": bfloat16 where :func:`native_bf16`, for the decoder only on CUDA; else float32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto":
        device = torch.device(device)
        if stage == "decoder" and device.type != "cuda":
            return None
        return torch.bfloat16 if native_bf16(device) else None
    raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_decode_batch(device: torch.device) -> int | None:
    """Prompts per transformer pass by device: 8 on the CPU (measured fastest, docs/engine.md), else no limit."""
    return 8 if torch.device(device).type == "cpu" else None


def decoder_image(sam: Sam, embedding: torch.Tensor, dense_pe: torch.Tensor) -> SharedImage:
    """The decoder's prompt-independent image side of one crop (embedding + "no mask" embedding, projected).

    Pass it to :func:`decode_scores` for every prompt batch of the crop; bit for bit the same results.
    """
    grid = embedding.shape[-2:]
    no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *grid)
    return shared_image(sam.mask_decoder.transformer, embedding + no_mask, dense_pe)


def decode_scores(
    sam: Sam, embedding: torch.Tensor, dense_pe: torch.Tensor, coords: torch.Tensor,
    shared: SharedImage | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First stage of the mask decoder for single foreground points: scores before masks.

    ``coords`` (B, 1, 2) are (x, y) in model-input pixels; ``embedding`` and
    ``dense_pe`` are (1, 256, G, G). Runs the prompt encoder, the two-way
    transformer and the IoU head, and stops before the upscaling of the image
    tokens, the costly part of the mask head. Returns the IoU-head score of
    the single-mask output (B,), its mask token (B, 256) and the image
    tokens (B, G*G, 256), which :func:`decode_masks` turns into logits for
    any subset of the prompts. Together they compute what
    ``sam.mask_decoder(..., multimask_output=False)`` computes.

    The image side enters the transformer once, with batch size 1, instead of
    once per prompt: until the first image-to-token attention it is the same
    for every prompt (image embedding + the "no mask" embedding). The
    transformer is :func:`cellseg1d.model.fastdecode.two_way_transformer`: the
    same function with the image-side projections moved to the prompt side
    (about 2x fewer operations per prompt on a CPU). Results match
    ``sam.mask_decoder`` up to float rounding (tested). ``shared``
    (:func:`decoder_image` of this embedding) reuses the image side across
    batches.
    """
    decoder = sam.mask_decoder
    batch = coords.shape[0]
    labels = torch.ones((batch, 1), dtype=torch.int, device=coords.device)  # (B, 1) foreground
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)  # (B, 2, 256), (B, 256, G, G)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)  # (1 + M, 256)
    tokens = torch.cat([output_tokens[None].expand(batch, -1, -1), sparse.to(output_tokens.dtype)], dim=1)
    src = embedding + dense[:1] if shared is None else None  # (1, 256, G, G): the same for every prompt
    # (B, 2, 256): only the IoU token and the single-mask token are needed; (B, G*G, 256)
    token_out, image_tokens = two_way_transformer(decoder.transformer, src, dense_pe, tokens, first_tokens=2,
                                                  shared=shared)
    iou = decoder.iou_prediction_head(token_out[:, 0])[:, 0]  # (B,) single-mask output
    return iou, token_out[:, 1], image_tokens


def decode_masks(sam: Sam, mask_token: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
    """Second stage of the mask decoder: low-resolution logits (K, 1, 4G, 4G) for the given prompts."""
    decoder = sam.mask_decoder
    k, n_tokens, channels = image_tokens.shape
    grid = int(round(n_tokens**0.5))
    src = image_tokens.transpose(1, 2).reshape(k, channels, grid, grid)  # (K, 256, G, G)
    upscaled = decoder.output_upscaling(src)  # (K, C', 4G, 4G)
    weights = decoder.output_hypernetworks_mlps[0](mask_token)  # (K, C')
    logits = torch.bmm(weights[:, None, :], upscaled.flatten(2))  # (K, 1, 16 G*G)
    return logits.view(k, 1, upscaled.shape[2], upscaled.shape[3])


def crop_candidates(
    sam: Sam,
    image_t: torch.Tensor,
    crop: CropBox,
    settings: InferenceSettings,
    *,
    autocast: torch.dtype | None = None,
    upsample_all: bool = False,
    dense_pe: torch.Tensor | None = None,
    clock: _Clock | None = None,
    covered: torch.Tensor | None = None,
    encoder_autocast: torch.dtype | None | str = "same",
) -> Candidates:
    """The masks of one crop that pass all filters, in the crop frame, before NMS.

    ``image_t`` is the whole image (3, H, W) uint8 on the model's device.
    ``upsample_all`` selects the reference order (mask logits for every
    prompt, upsampled, then filtered); by default the prompts are filtered
    on their IoU-head scores before any mask is computed. Both give the
    same candidates. ``covered`` (H, W) bool, image frame, turns on point
    skipping (``settings.skip_covered_points``): points inside it are not
    decoded, and the accepted masks are added to it. ``autocast`` is the
    decoder's autocast dtype, ``encoder_autocast`` the encoder's ("same": ``autocast``).
    """
    device = image_t.device
    image_hw = (int(image_t.shape[1]), int(image_t.shape[2]))
    clock = clock or _Clock(None, device)
    crop_hw = (crop.height, crop.width)
    with clock.stage("embed"):
        x, new_hw = _model_input(sam, image_t, crop, settings.image_size)
        with _autocast(device, autocast if encoder_autocast == "same" else encoder_autocast):
            embedding = sam.image_encoder(x)  # (1, 256, G, G)
        embedding = embedding.float()  # no-op in float32; the decoder's autocast casts again where it runs
        if dense_pe is None:
            dense_pe = sam.prompt_encoder.get_dense_pe()  # (1, 256, G, G)

    points = points_in_crop(point_grid(settings.points_per_side), crop)  # (P, 2) crop pixels
    scale = np.array([new_hw[1] / crop.width, new_hw[0] / crop.height])
    # float64, as segment-anything's apply_coords: the prompt encoder adds 0.5 and divides by the
    # input size in float64 before its float32 projection, so the embeddings equal the reference's.
    model_points = torch.as_tensor(points * scale[None, :], dtype=torch.float64, device=device)  # (P, 2)
    max_area = settings.max_area_fraction * image_hw[0] * image_hw[1]
    clock.count("prompts", len(points))

    with clock.stage("decode"), _autocast(device, autocast):
        shared = decoder_image(sam, embedding, dense_pe)
    step = settings.decode_batch or default_decode_batch(device) or settings.points_per_batch
    parts: list[Candidates] = []
    for batch in _prompt_batches(points, crop, settings, covered):
        clock.count("decoded", len(batch))
        found: list[Candidates] = []
        for sub in sub_batches(len(batch), step):  # the same masks, in the same order
            coords = model_points[batch[sub], None, :]  # (b, 1, 2)
            with clock.stage("decode"), _autocast(device, autocast):
                iou, mask_token, image_tokens = decode_scores(sam, embedding, dense_pe, coords, shared=shared)
            iou = iou.float()
            keep = (torch.ones_like(iou, dtype=torch.bool) if upsample_all
                    else passes_iou(iou, settings.pred_iou_thresh))
            if not bool(keep.any()):
                continue
            with clock.stage("mask_decode"), _autocast(device, autocast):
                low_res = decode_masks(sam, mask_token[keep], image_tokens[keep])  # (K, 1, 4G, 4G)
            with clock.stage("filter"):
                found.append(_filter_batch(sam, low_res.float(), iou[keep], crop, new_hw, crop_hw, image_hw,
                                           max_area, settings, clock, upsample_first=upsample_all))
        if covered is not None:
            for part in found:
                if len(part):
                    covered[crop.y0 : crop.y1, crop.x0 : crop.x1] |= part.masks.any(dim=0)
        parts.extend(found)
    return Candidates.cat(parts, crop_hw, device)


def sub_batches(n: int, size: int) -> list[slice]:
    """Slices of ``n`` prompts in passes of ``size``, none of a single prompt unless ``n`` is 1.

    The transformer takes another (equivalent, not bit-equal) route for a batch of one prompt
    (:mod:`cellseg1d.model.fastdecode`), so splitting must not create one: a last pass of one
    prompt joins the pass before it.
    """
    size = max(2, size)
    bounds = list(range(0, n, size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def coarse_to_fine(points_per_side: int) -> list[np.ndarray]:
    """Indices into :func:`point_grid` in levels: every 4th row/column, then every 2nd, then the rest.

    Decoding the coarse levels first lets :attr:`InferenceSettings.skip_covered_points` drop the
    finer points that fall inside cells the coarse points already found.
    """
    iy, ix = np.divmod(np.arange(points_per_side * points_per_side), points_per_side)
    level = np.where((iy % 4 == 0) & (ix % 4 == 0), 0, np.where((iy % 2 == 0) & (ix % 2 == 0), 1, 2))
    return [np.flatnonzero(level == i) for i in range(3)]


def _prompt_batches(
    points: np.ndarray, crop: CropBox, settings: InferenceSettings, covered: torch.Tensor | None
) -> Iterator[np.ndarray]:
    """Index batches of the prompts to decode: the whole grid in order, or coarse to fine minus covered points."""
    size = settings.points_per_batch
    if covered is None:
        for start in range(0, len(points), size):
            yield np.arange(start, min(start + size, len(points)))
        return
    # pixel of each point in the image frame
    px = np.clip(np.floor(points[:, 0]).astype(np.int64), 0, crop.width - 1) + crop.x0
    py = np.clip(np.floor(points[:, 1]).astype(np.int64), 0, crop.height - 1) + crop.y0
    for level in coarse_to_fine(settings.points_per_side):
        for start in range(0, len(level), size):
            index = level[start : start + size]
            hit = covered[torch.as_tensor(py[index]), torch.as_tensor(px[index])].cpu().numpy()
            if not hit.all():
                yield index[~hit]


def _filter_batch(
    sam: Sam,
    low_res: torch.Tensor,
    iou: torch.Tensor,
    crop: CropBox,
    new_hw: tuple[int, int],
    crop_hw: tuple[int, int],
    image_hw: tuple[int, int],
    max_area: float,
    settings: InferenceSettings,
    clock: _Clock,
    upsample_first: bool = False,
) -> Candidates:
    """Apply the per-mask filters to decoded masks: low_res (K, 1, h, w) float32 logits, iou (K,).

    ``upsample_first`` is the reference order: every mask is upsampled before the IoU-head filter.
    """
    keep = passes_iou(iou, settings.pred_iou_thresh)  # all true unless on the upsample-all path
    if upsample_first:
        logits = sam.postprocess_masks(low_res, new_hw, crop_hw)[:, 0][keep]  # (K, h_c, w_c)
    else:
        logits = sam.postprocess_masks(low_res[keep], new_hw, crop_hw)[:, 0]  # (K, h_c, w_c)
    iou = iou[keep]
    clock.count("iou", len(iou))
    stability = stability_score(logits, sam.mask_threshold, settings.stability_score_offset)
    keep = stability >= settings.stability_score_thresh
    masks = logits[keep] > sam.mask_threshold  # (K, h_c, w_c) bool
    iou, stability = iou[keep], stability[keep]
    area = masks.flatten(1).sum(dim=1)
    keep = (area > 0) & (area < max_area)
    masks, iou, stability = masks[keep], iou[keep], stability[keep]
    boxes = nms_ops.mask_boxes(masks)
    keep = ~near_crop_edge(boxes, crop, image_hw, settings.crop_edge_margin)
    clock.count("filters", int(keep.sum()))
    return Candidates(masks[keep], iou[keep], stability[keep], boxes[keep])


def passes_iou(iou: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N,) bool: IoU-head scores strictly above ``threshold``; all pass when it is 0 (the reference's test)."""
    if threshold <= 0:
        return torch.ones_like(iou, dtype=torch.bool)
    return iou > threshold


def _uncrop(c: Candidates, crop: CropBox, image_hw: tuple[int, int]) -> Candidates:
    """Candidates from the crop frame to the image frame (masks zero-padded, boxes shifted)."""
    height, width = image_hw
    masks = F.pad(c.masks, (crop.x0, width - crop.x1, crop.y0, height - crop.y1))  # (N, H, W)
    boxes = c.boxes + torch.tensor([crop.x0, crop.y0, crop.x0, crop.y0], device=c.boxes.device)
    return Candidates(masks, c.iou_pred, c.stability, boxes)


def _resolve_device(sam: Sam, device: torch.device | str | None) -> torch.device:
    model_device = torch.device(sam.device)
    if device is None:
        return model_device
    device = torch.device(device)
    if device.type != model_device.type or (device.index is not None and device.index != model_device.index):
        raise ValueError(f"the model is on {model_device}, not on {device}; move it first (sam.to(device))")
    return model_device


def cleanup_nms(
    masks: torch.Tensor,
    cleaned: torch.Tensor,
    changed: torch.Tensor,
    quality: torch.Tensor,
    settings: InferenceSettings,
) -> torch.Tensor:
    """Indices (K,) kept by the NMS after clean-up, in rank order.

    ``masks`` (N, H, W) bool before clean-up, ``cleaned`` after, ``changed``
    (N,) bool, ``quality`` (N,) IoU-head score x stability. See
    :class:`InferenceSettings` (``cleanup_nms``).
    """
    threshold = max(settings.nms_thresh, settings.crop_nms_thresh)
    cleaned_boxes = nms_ops.mask_boxes(cleaned)
    gate = cleaned_boxes if settings.box_gate else None
    if settings.cleanup_nms == "reference":
        scores = (~changed).to(torch.float32)
        return nms_ops.mask_nms(masks, scores, threshold, gate_boxes=gate, chunk=settings.nms_chunk)
    return nms_ops.mask_nms(cleaned, _cleanup_scores(changed, quality), threshold, boxes=cleaned_boxes,
                            gate_boxes=gate, chunk=settings.nms_chunk)


def _cleanup_scores(changed: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Scores ranking unchanged masks above cleaned ones, then by quality."""
    spread = float(quality.max() - quality.min()) + 1.0 if len(quality) else 1.0
    return quality + (~changed).to(quality.dtype) * spread


class OutOfMemory(CellsegError):
    """Segmentation ran out of memory even with the smallest prompt batch."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device or host allocation failure (CUDA OOM, CPU allocator failure, MemoryError)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def segment_image(
    sam: Sam,
    image: np.ndarray,
    settings: InferenceSettings | None = None,
    device: torch.device | str | None = None,
    *,
    autocast: torch.dtype | None = None,
    upsample_all: bool = False,
    report: InferenceReport | None = None,
) -> np.ndarray:
    """Segment cells in one image with SAM automatic mask generation; labels (H, W) uint32, 1..N.

    When an allocation fails (GPU or CPU out of memory), the image is
    segmented again with half the prompt batch and half the NMS block,
    down to one prompt per batch; the batch sizes do not change the
    result. Each retry is logged and counted in ``report.counts["oom_retries"]``;
    if even one prompt per batch does not fit, :class:`OutOfMemory` says
    what to change. Arguments are those of :func:`segment_image_once`.
    """
    settings = settings or InferenceSettings()
    while True:
        try:
            return segment_image_once(sam, image, settings, device, autocast=autocast,
                                      upsample_all=upsample_all, report=report)
        except Exception as exc:  # noqa: BLE001 - only allocation failures are handled
            if not is_out_of_memory(exc):
                raise
            where = torch.device(sam.device)
            if settings.points_per_batch <= 1:
                raise OutOfMemory(
                    f"out of memory on {where} segmenting a {image.shape[0]}x{image.shape[1]} image even with "
                    "one prompt per batch; segment in smaller tiles (setting sam.tile), lower sam.image_size, "
                    "free memory used by other programs, or use the CPU (sam.device = \"cpu\")"
                ) from exc
            chunk = settings.nms_chunk or nms_ops.default_chunk(where)
            passes = None if settings.decode_batch is None else max(1, settings.decode_batch // 2)
            smaller = replace(settings, points_per_batch=max(1, settings.points_per_batch // 2),
                              decode_batch=passes, nms_chunk=max(1, chunk // 2))
            log.warning("out of memory on %s with %d prompts per batch; retrying with %d (%s)", where,
                        settings.points_per_batch, smaller.points_per_batch, str(exc).splitlines()[0][:200])
            settings = smaller
            del exc
            if where.type == "cuda":
                torch.cuda.empty_cache()
            if report is not None:
                report.seconds.clear()
                retries = report.counts.get("oom_retries", 0) + 1
                report.counts.clear()
                report.counts["oom_retries"] = retries


def segment_image_once(
    sam: Sam,
    image: np.ndarray,
    settings: InferenceSettings | None = None,
    device: torch.device | str | None = None,
    *,
    autocast: torch.dtype | None = None,
    upsample_all: bool = False,
    report: InferenceReport | None = None,
) -> np.ndarray:
    """Segment cells in one image with SAM automatic mask generation; labels (H, W) uint32, 1..N.

    Parameters
    ----------
    sam : Sam
        The model (LoRA-adapted or not), already on ``device`` and in eval mode.
    image : ndarray
        (H, W, 3), (H, W, 1) or (H, W) uint8. Every crop is resized so that its
        longest side is ``settings.image_size``; images much larger than that
        should go through :func:`cellseg1d.model.tiling.segment_large`.
    settings : InferenceSettings, optional
        Paper defaults when omitted.
    device : torch.device or str, optional
        Must be the model's device (the default).
    autocast : torch.dtype, optional
        Run the encoder and decoder under ``torch.autocast`` with this dtype
        (e.g. ``torch.bfloat16``); their outputs are cast to float32 before
        any thresholding. Without it, ``settings.encoder_precision`` and
        ``settings.decoder_precision`` decide (float32 by default).
    upsample_all : bool
        Reference order: mask logits for every prompt, all upsampled, then the filters
        (slower, same result).
    report : InferenceReport, optional
        Filled with stage times and mask counts.
    """
    settings = settings or InferenceSettings()
    model_size = int(sam.image_encoder.img_size)
    if settings.image_size > model_size:
        raise ValueError(f"settings.image_size {settings.image_size} exceeds the model input size {model_size}")
    rgb = as_rgb_uint8(image)
    device = _resolve_device(sam, device)
    image_hw = (rgb.shape[0], rgb.shape[1])
    clock = _Clock(report, device)
    if autocast is not None:
        encoder_dtype = decoder_dtype = autocast
    else:
        encoder_dtype = precision_dtype(settings.encoder_precision, device, "encoder")
        decoder_dtype = precision_dtype(settings.decoder_precision, device, "decoder")
    with torch.inference_mode():
        image_t = torch.from_numpy(rgb).to(device).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        dense_pe = sam.prompt_encoder.get_dense_pe()
        crops = crop_boxes(image_hw, settings.crop_n_layers, settings.crop_overlap_ratio)
        per_crop: list[Candidates] = []
        covered = torch.zeros(image_hw, dtype=torch.bool, device=device) if settings.skip_covered_points else None
        for crop in crops:
            cand = crop_candidates(sam, image_t, crop, settings, autocast=decoder_dtype, upsample_all=upsample_all,
                                   dense_pe=dense_pe, clock=clock, covered=covered, encoder_autocast=encoder_dtype)
            with clock.stage("nms"):
                keep = nms_ops.mask_nms(cand.masks, cand.iou_pred, settings.crop_nms_thresh, boxes=cand.boxes,
                                        gate_boxes=cand.boxes if settings.box_gate else None,
                                        chunk=settings.nms_chunk)
                cand = _uncrop(cand.select(keep), crop, image_hw)
            clock.count("crop_nms", len(cand))
            per_crop.append(cand)

        with clock.stage("nms"):
            cand = Candidates.cat(per_crop, image_hw, device)
            del per_crop
            if len(crops) > 1 and len(cand):
                keep = nms_ops.mask_nms(cand.masks, cand.iou_pred * cand.stability, settings.crop_nms_thresh,
                                        boxes=cand.boxes, gate_boxes=cand.boxes if settings.box_gate else None,
                                        chunk=settings.nms_chunk)
                cand = cand.select(keep)
        clock.count("cross_nms", len(cand))

        with clock.stage("postprocess"):
            masks = cand.masks.cpu().numpy()
            if settings.min_region_area > 0 and len(masks):
                cleaned, changed = remove_small_regions(masks, settings.min_region_area)
        if settings.min_region_area > 0 and len(masks):
            with clock.stage("nms"):
                keep = cleanup_nms(cand.masks, torch.from_numpy(cleaned).to(device),
                                   torch.from_numpy(changed).to(device), cand.iou_pred * cand.stability,
                                   settings).cpu().numpy()
            masks = cleaned[keep]  # rank order, as the reference passes them on
        with clock.stage("postprocess"):
            area = masks.sum(axis=(1, 2))
            masks = masks[(area > 0) & (area < settings.max_area_fraction * image_hw[0] * image_hw[1])]
            clock.count("cleanup_nms", masks.shape[0])
            labels = paint_labels(masks, image_hw, mode=settings.paint)
        clock.count("labels", int(labels.max()) if labels.size else 0)
    return labels
