"""RetinaFace training loss: batched anchor matching + box / class / landmark (/ IoU) terms.

Targets
-------
Per image a float tensor ``(K, 15)`` in **pixels** of the network input (the convention of
``utils/data_loaders.py``): ``x1, y1, x2, y2``, five landmark points ``(x, y)``, and a flag
``1`` (the face has landmarks) / ``-1`` (it has none). :func:`pad_targets` turns the list of a
batch into one ``(B, Kmax, 15)`` tensor plus a ``(B, Kmax)`` validity mask so the whole batch is
matched at once on the device (no per-image Python loop, no host synchronisation).

Matching (:func:`match_anchors`, the protocol of the public Pytorch_Retinaface ``match``)
-----------------------------------------------------------------------------------------
For each image, with IoU computed between every face box and every anchor (anchors given as
``cx, cy, w, h``, in the same pixel units):

1. every anchor takes the face it overlaps most (first face on ties);
2. every face whose best IoU over all anchors is ``>= force_min_iou`` (0.2) claims that best
   anchor (first anchor on ties) even when the IoU is below the threshold; if two faces claim
   the same anchor the face listed later wins (as the sequential assignment of the public code);
   faces whose best IoU is below 0.2 ("hard" faces) claim nothing;
3. an anchor is positive when it was claimed in step 2 or its IoU with its face is
   ``>= threshold`` (0.35); every other anchor is a negative candidate.

Padding slots never match. An image without faces (or whose faces all overlap no anchor by
0.2) has only negatives. One deliberate difference from the public code: there a face with best
IoU < 0.2 still overwrites which face its best anchor is assigned to (without making it
positive); here it claims nothing, so an anchor's face is always one it overlaps enough.

Loss terms (per stage, all normalised like the public ``MultiBoxLoss``)
-----------------------------------------------------------------------
With ``P`` = number of positive anchors in the batch (at least 1) and ``L`` = positives whose
face has landmarks (at least 1):

* ``loss_box``: smooth-L1 (beta 1) between predicted offsets and the encoded matched face boxes
  (``utils.box_utils.encode``, variances 0.1/0.2), summed over positives, divided by ``P``;
* ``loss_cls``: 2-way cross-entropy over positives and mined hard negatives, divided by ``P``.
  Hard negatives: per image the ``min(7 * positives_in_image, N - 1)`` negative anchors with the
  highest background cross-entropy. An image without positives (no faces, or only faces too
  small for any anchor) contributes no negatives, as in the public code, unless
  ``empty_image_negatives`` > 0: it then contributes that many of its hardest anchors;
* ``loss_landm``: smooth-L1 between landmark offsets and the encoded landmarks of the matched
  face (``encode_landm``), over positives whose face has landmarks, divided by ``L``; exactly 0
  when no matched face has landmarks or with ``landmark_loss=False``;
* ``loss_iou`` (``tina`` models): binary cross-entropy on the IoU logit, target = IoU between
  the positive's decoded predicted box (detached) and its matched face, over positives, divided
  by ``P``; 0 for ``retina`` models.

Stage total = ``box_weight * loss_box + loss_cls + landm_weight * loss_landm + iou_weight *
loss_iou`` with ``box_weight = 2`` (public ``loc_weight``) and unit other weights.

Cascade (the semantics of :meth:`models.retinaface.RetinaFace.stage_predictions`)
------------------------------------------------------------------------------
* ``refine``: stage 1 is matched against the priors; stage 2's anchors are the detached stage-1
  decoded boxes, one set per image ``(B, N, 4)``: faces are matched against those boxes (same
  thresholds) and the targets are encoded relative to them.
* ``residual``: both stages use the priors, so matching is done once and shared; stage 2's
  box offsets are stage-1 + stage-2 outputs, its landmark offsets its own (as
  ``stage_predictions`` returns them).

Returned dict (all 0-dim float32 tensors on the device; nothing is synchronised)
-------------------------------------------------------------------------------
``stage{s}/loss_box``, ``stage{s}/loss_cls``, ``stage{s}/loss_landm``, ``stage{s}/loss_iou``,
``stage{s}/total`` for ``s = 1..num_stages``; ``loss_box``, ``loss_cls``, ``loss_landm``,
``loss_iou``: sums over stages (unweighted); ``total``: sum of the stage totals (what to
backpropagate); ``num_pos``: positives of the last stage (float, for logging).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.box_utils import VARIANCES, decode, encode, encode_landm, point_form

__all__ = [
    "MatchResult",
    "PaddedTargets",
    "pad_targets",
    "box_iou_batched",
    "match_anchors",
    "MultiBoxLoss",
    "LOSS_TERMS",
    "loss_keys",
]

LOSS_TERMS = ("loss_box", "loss_cls", "loss_landm", "loss_iou")
TARGET_COLUMNS = 15


def loss_keys(num_stages: int) -> list[str]:
    """Keys of the dict returned by :class:`MultiBoxLoss` for a model with ``num_stages`` stages."""
    keys = [f"stage{s}/{t}" for s in range(1, num_stages + 1) for t in (*LOSS_TERMS, "total")]
    return keys + list(LOSS_TERMS) + ["total", "num_pos"]


class PaddedTargets(NamedTuple):
    """The faces of a batch, padded (what :func:`pad_targets` returns).

    ``targets`` (B, Kmax, 15) float32, pixels of the network input, the rows of image ``b``
    first and zero rows after them; ``valid`` (B, Kmax) bool, True on the real rows; ``faces``
    (2, F) int64 or None: image and row of every real row (``valid.nonzero().T``), filled when the
    batch is moved to a device so that matching does not read ``valid`` back from it.
    """

    targets: torch.Tensor
    valid: torch.Tensor
    faces: torch.Tensor | None = None


def pad_targets(targets: Sequence[torch.Tensor] | PaddedTargets, device: torch.device | str | None = None,
                min_faces: int = 1) -> PaddedTargets:
    """List of ``B`` tensors ``(K_i, 15)`` -> ``(B, Kmax, 15)`` float32 and a ``(B, Kmax)`` bool mask.

    ``Kmax = max(max K_i, min_faces)``; padding rows are zero and masked out. Built on the host
    (the list's tensors usually come from the DataLoader) and moved to ``device`` with the index
    of the real rows (``faces``, computed on the host from the mask; three copies). An already
    padded batch (the training DataLoader pads in its workers:
    :func:`utils.train_data.collate_with_report`) is only moved to ``device``.
    """
    if isinstance(targets, PaddedTargets):
        if device is None:
            return targets
        padded, valid, faces = targets
    else:
        counts = [int(t.shape[0]) for t in targets]
        padded = torch.zeros(len(targets), max(counts + [min_faces]), TARGET_COLUMNS, dtype=torch.float32)
        valid = torch.zeros(padded.shape[:2], dtype=torch.bool)
        for i, t in enumerate(targets):
            if counts[i]:
                padded[i, :counts[i]] = t.detach().to("cpu", torch.float32).reshape(-1, TARGET_COLUMNS)
                valid[i, :counts[i]] = True
        if device is None:
            return PaddedTargets(padded, valid)
        faces = None
    device = torch.device(device)
    if faces is None and valid.device.type == "cpu":  # on a device, nonzero would wait for it
        faces = valid.nonzero().T.contiguous()
    if device.type == "cpu":
        return PaddedTargets(padded.to(device), valid.to(device), faces)
    return PaddedTargets(*(None if t is None else _to_device(t, device) for t in (padded, valid, faces)))


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy without making the host wait: from pinned memory (pinned here when it is not)."""
    if tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def box_iou_batched(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """IoU of x1y1x2y2 boxes ``(B, K, 4)`` against ``(B, N, 4)`` or ``(N, 4)`` -> ``(B, K, N)``."""
    if boxes_b.dim() == 2:
        boxes_b = boxes_b.unsqueeze(0)
    a = boxes_a.unsqueeze(2)  # (B, K, 1, 4)
    b = boxes_b.unsqueeze(1)  # (B or 1, 1, N, 4)
    inter_w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_(min=0)
    inter_h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_(min=0)
    inter = inter_w.mul_(inter_h)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter)


class MatchResult(NamedTuple):
    """Matching of a batch. ``face_index`` (B, N) int64: matched face (index into Kmax) of every
    anchor (meaningful where ``positive``); ``positive`` (B, N) bool; ``overlap`` (B, N) float:
    IoU with the matched face (2.0 for anchors claimed as a face's best anchor, -1 where the
    image has no face)."""

    face_index: torch.Tensor
    positive: torch.Tensor
    overlap: torch.Tensor


def _face_anchor_iou(face_boxes: torch.Tensor, face_image: torch.Tensor, anchors_xyxy: torch.Tensor) -> torch.Tensor:
    """IoU ``(F, N)`` of faces ``(F, 4)`` with the anchors of their images (shared ``(N, 4)`` or
    per image ``(B, N, 4)``, picked by ``face_image``)."""
    if anchors_xyxy.dim() == 2:
        return box_iou_batched(face_boxes.unsqueeze(0), anchors_xyxy)[0]
    return box_iou_batched(face_boxes.unsqueeze(1), anchors_xyxy[face_image])[:, 0]


def match_anchors(boxes: torch.Tensor, valid: torch.Tensor, anchors: torch.Tensor,
                  threshold: float = 0.35, force_min_iou: float = 0.2,
                  max_elements: int = 1 << 25, faces: torch.Tensor | None = None) -> MatchResult:
    """Match faces to anchors for a whole batch (see the module docstring for the protocol).

    The IoU is computed for the real faces only, all images' faces in one ``(F, N)`` tensor, and
    reduced per image by scatter operations: a batch with one crowded image costs its faces, not
    ``B`` times its face count as a padded ``(B, Kmax, N)`` tensor would.

    Args:
        boxes: ``(B, K, 4)`` face boxes x1y1x2y2 (padding rows arbitrary).
        valid: ``(B, K)`` bool, False for padding rows.
        anchors: ``(N, 4)`` shared or ``(B, N, 4)`` per-image anchors, ``cx, cy, w, h``.
        threshold: IoU from which an anchor is positive (0.35).
        force_min_iou: a face claims its best anchor only when that IoU is ``>=`` this (0.2).
        max_elements: the ``(F, N)`` IoU tensor is built for groups of faces whose size stays
            under this many elements (memory bound for crowded batches; the IoU is then computed
            twice); results are identical.
        faces: ``(2, F)`` int64 image and row of every real face, ``valid.nonzero().T`` (what
            :func:`pad_targets` computes on the host when it moves a batch); None computes it here,
            which makes the host wait for the device when ``valid`` is on one.
    """
    anchors_xyxy = point_form(anchors.float())
    batch, kmax = valid.shape
    num_anchors = anchors.shape[-2]
    device = boxes.device
    face_image, face_row = valid.nonzero().T if faces is None else faces
    face_boxes = boxes[face_image, face_row].float()  # (F, 4)
    num_faces = face_boxes.shape[0]
    overlap = torch.full((batch, num_anchors), -1.0, device=device)  # stays -1 in an image without faces
    if num_faces == 0:
        return MatchResult(torch.zeros_like(overlap, dtype=torch.long), overlap >= threshold, overlap)
    chunk = max(1, max_elements // max(num_anchors, 1))
    groups = [slice(start, start + chunk) for start in range(0, num_faces, chunk)]

    def group_iou(group: slice) -> torch.Tensor:
        return _face_anchor_iou(face_boxes[group], face_image[group], anchors_xyxy)

    # per image and anchor the best IoU over the image's faces; every face's best anchor (first on ties)
    best = []
    for group in groups:
        iou = group_iou(group)
        best.append(iou.max(dim=1))
        overlap.scatter_reduce_(0, face_image[group].unsqueeze(1).expand_as(iou), iou, reduce="amax")
    best_anchor_iou, best_anchor = best[0] if len(best) == 1 else (torch.cat(items) for items in zip(*best))
    # every anchor's face: the first face of its image that reaches that best IoU
    face_index = torch.full_like(overlap, kmax, dtype=torch.long)
    for group in groups:
        iou = iou if len(groups) == 1 else group_iou(group)
        image = face_image[group].unsqueeze(1).expand_as(iou)
        is_best = iou == overlap.gather(0, image)
        face_index.scatter_reduce_(0, image, torch.where(is_best, face_row[group].unsqueeze(1), kmax), reduce="amin")
    face_index.masked_fill_(face_index == kmax, 0)  # images without faces

    # faces with a good enough best anchor claim it; the later face wins a shared anchor
    claims = torch.where(best_anchor_iou >= force_min_iou, face_row, -1)
    claimed_by = torch.full((batch * num_anchors,), -1, dtype=torch.long, device=device)
    claimed_by.scatter_reduce_(0, face_image * num_anchors + best_anchor, claims, reduce="amax")
    claimed_by = claimed_by.view(batch, num_anchors)
    is_claimed = claimed_by >= 0
    face_index = torch.where(is_claimed, claimed_by, face_index)
    overlap = torch.where(is_claimed, torch.full_like(overlap, 2.0), overlap)
    return MatchResult(face_index, overlap >= threshold, overlap)


def _gather_faces(targets: torch.Tensor, face_index: torch.Tensor) -> torch.Tensor:
    """``targets`` (B, K, C), ``face_index`` (B, N) -> (B, N, C)."""
    return torch.gather(targets, 1, face_index.unsqueeze(-1).expand(-1, -1, targets.shape[-1]))


def _pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of x1y1x2y2 boxes ``(..., 4)``."""
    inter_w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    inter_h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    return inter / (area_a + area_b - inter).clamp(min=1e-9)


def hard_negative_mask(cls_loss: torch.Tensor, positive: torch.Tensor, neg_pos_ratio: float,
                       empty_image_negatives: int = 0) -> torch.Tensor:
    """Per image the ``min(ratio * positives, N - 1)`` non-positive anchors with the largest
    ``cls_loss`` (B, N) (ties broken by anchor order, stable sort); in an image without positives
    ``min(empty_image_negatives, N - 1)`` of them. Returns (B, N) bool."""
    mining = cls_loss.detach().masked_fill(positive, 0.0)
    order = torch.sort(mining, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    num_pos = positive.sum(dim=1, keepdim=True)
    num_neg = num_pos * neg_pos_ratio
    if empty_image_negatives:
        num_neg = torch.where(num_pos == 0, torch.full_like(num_neg, empty_image_negatives), num_neg)
    num_neg = torch.clamp(num_neg, max=positive.shape[1] - 1)
    return (rank < num_neg) & ~positive


def loss_denominators(counts: torch.Tensor) -> torch.Tensor:
    """What each process divides its loss terms by: ``counts`` (positives) of the whole batch, at
    least 1 as in the public loss, over the number of processes of a distributed run (DDP averages
    their gradients, so the shares add up to one division by the whole batch's count). The floor
    applies to the whole batch's count: on 2 processes, 1 positive in all gives 0.5 each, not 1."""
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            counts = counts.detach().clone()
            torch.distributed.all_reduce(counts)
    return counts.clamp(min=1.0) / world


class MultiBoxLoss(nn.Module):
    """RetinaFace loss for every stage of a :class:`~models.retinaface.RetinaFace` (see module doc).

    Args:
        model_config: the model's :class:`~models.retinaface.ModelConfig` (cascade mode, tina).
        threshold: positive IoU (0.35); force_min_iou: minimum IoU of a face's forced best
            anchor (0.2); neg_pos_ratio: hard negatives per positive (7).
        box_weight (2), landm_weight (1), iou_weight (1): weights in the stage total.
        landmark_loss: False switches the landmark term off (it is then exactly 0).
        empty_image_negatives: hard negatives mined in an image without positive anchors (0: none,
            as the public loss, so such images add no loss term). They are normalised like all
            other terms, by the positives of the batch (at least 1).

    ``forward(model, outputs, priors, targets)``: ``model`` provides ``stage_predictions`` (the
    cascade semantics; a ``DistributedDataParallel`` wrapper is looked through); ``outputs`` its
    forward result; ``priors`` (N, 4) pixel anchors of the input size; ``targets`` a list of
    ``(K_i, 15)`` tensors or an already padded batch (:class:`PaddedTargets`).

    Under ``torch.distributed`` the terms are divided by the mean count of positives per process
    (one all-reduce per stage): with DDP's gradient averaging this equals the public recipe's
    division by the positives of the whole batch, however the faces fall across processes.
    """

    def __init__(self, model_config, threshold: float = 0.35, force_min_iou: float = 0.2,
                 neg_pos_ratio: float = 7.0, box_weight: float = 2.0, landm_weight: float = 1.0,
                 iou_weight: float = 1.0, landmark_loss: bool = True, empty_image_negatives: int = 0,
                 variances: tuple[float, float] = VARIANCES) -> None:
        super().__init__()
        self.config = model_config
        self.threshold = threshold
        self.force_min_iou = force_min_iou
        self.neg_pos_ratio = neg_pos_ratio
        self.box_weight = box_weight
        self.landm_weight = landm_weight
        self.iou_weight = iou_weight
        self.landmark_loss = landmark_loss
        self.empty_image_negatives = empty_image_negatives
        self.variances = variances

    def forward(self, model: nn.Module, outputs, priors: torch.Tensor,
                targets: Sequence[torch.Tensor] | PaddedTargets) -> dict[str, torch.Tensor]:
        model = getattr(model, "module", model)
        device = outputs[0].loc.device
        padded, valid, faces = pad_targets(targets, device)
        if faces is None:  # a batch put on the device by hand: one wait for the device, for every stage
            faces = valid.nonzero().T
        stages = model.stage_predictions(outputs, priors)
        result: dict[str, torch.Tensor] = {}
        totals = {t: None for t in (*LOSS_TERMS, "total")}
        prior_match = None
        num_pos = None
        for s, stage in enumerate(stages, start=1):
            anchors = stage.anchors.float()
            if anchors.dim() == 2:  # shared anchors (the priors): match once for every such stage
                if prior_match is None:
                    prior_match = match_anchors(padded[..., :4], valid, anchors, self.threshold,
                                                self.force_min_iou, faces=faces)
                match = prior_match
            else:
                match = match_anchors(padded[..., :4], valid, anchors, self.threshold, self.force_min_iou,
                                      faces=faces)
            terms, num_pos = self._stage_loss(stage, anchors, match, padded)
            stage_total = (self.box_weight * terms["loss_box"] + terms["loss_cls"]
                           + self.landm_weight * terms["loss_landm"] + self.iou_weight * terms["loss_iou"])
            terms["total"] = stage_total
            for name, value in terms.items():
                result[f"stage{s}/{name}"] = value
                totals[name] = value if totals[name] is None else totals[name] + value
        result.update(totals)
        result["num_pos"] = num_pos
        return result

    def _stage_loss(self, stage, anchors: torch.Tensor, match: MatchResult, padded: torch.Tensor
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        loc, conf, landm = stage.loc.float(), stage.conf.float(), stage.landm.float()
        positive = match.positive
        pos_f = positive.float()
        num_pos = pos_f.sum()
        matched = _gather_faces(padded, match.face_index)  # (B, N, 15)
        has_landm = positive & (matched[..., 14] > 0)
        landm_f = has_landm.float()
        denom, landm_denom = loss_denominators(torch.stack([num_pos, landm_f.sum()]))
        matched_boxes = matched[..., :4]
        # Encode only where positive; elsewhere use the anchor itself (finite, masked out anyway).
        safe_boxes = torch.where(positive.unsqueeze(-1), matched_boxes, point_form(anchors).expand_as(matched_boxes))
        loc_t = encode(safe_boxes, anchors, self.variances)
        box = (F.smooth_l1_loss(loc, loc_t, reduction="none").sum(-1) * pos_f).sum() / denom

        target_cls = positive.long()
        ce = F.cross_entropy(conf.reshape(-1, 2), target_cls.reshape(-1), reduction="none").view_as(pos_f)
        negative = hard_negative_mask(ce, positive, self.neg_pos_ratio, self.empty_image_negatives)
        cls = (ce * (positive | negative).float()).sum() / denom

        if self.landmark_loss:
            landm_t = encode_landm(torch.where(has_landm.unsqueeze(-1), matched[..., 4:14],
                                               torch.zeros_like(matched[..., 4:14])), anchors, self.variances)
            landm_loss = (F.smooth_l1_loss(landm, landm_t, reduction="none").sum(-1) * landm_f).sum()
            landm_loss = landm_loss / landm_denom
        else:
            landm_loss = landm.sum() * 0.0  # keeps the head in the graph (DDP), value exactly 0

        if stage.iou is not None:
            with torch.no_grad():
                pred_boxes = decode(loc.detach(), anchors, self.variances)
                iou_t = _pairwise_iou(pred_boxes, matched_boxes).clamp(0.0, 1.0)
                iou_t = torch.where(positive, iou_t, torch.zeros_like(iou_t))
            bce = F.binary_cross_entropy_with_logits(stage.iou.float()[..., 0], iou_t, reduction="none")
            iou_loss = (bce * pos_f).sum() / denom
        else:
            iou_loss = loc.new_zeros(())
        return {"loss_box": box, "loss_cls": cls, "loss_landm": landm_loss, "loss_iou": iou_loss}, num_pos
