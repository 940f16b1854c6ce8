"""The task metrics of the segmentation and detection suites, as plain functions of predictions and truth.

- **mIoU** (`mean_iou`): per class, intersection / union of the predicted and true pixels, each accumulated over
  the whole evaluation set (a confusion matrix summed over every pixel of every image, not an average of
  per-image IoUs); the mean over the classes, background included. A class absent from both the predictions
  and the truth has no IoU (0 / 0) and is left out of the mean.
- **mAP@0.5** (`mean_average_precision`): per class, the detections of every image ranked by score; a detection
  is a true positive when its IoU with the best-overlapping true box of its class in its image is above 0.5
  and that box was not matched by a higher-scored detection (a duplicate is a false positive, PASCAL VOC's
  rule); the average precision is VOC's all-point interpolation (the area under the precision envelope over
  recall); the mean is over the classes present in the ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from examples.task_data import box_iou

IOU_THRESHOLD = 0.5


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts: row = true class, column = predicted class, over all elements."""
    pairs = labels.flatten().long() * num_classes + predictions.flatten().long()
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


def mean_iou(confusion: torch.Tensor) -> tuple[float, list[float | None]]:
    """The mean IoU over the classes of an accumulated confusion matrix, and each class's IoU (None: absent
    from both predictions and truth, not in the mean)."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    ious = [float(i / u) if u > 0 else None for i, u in zip(intersection, union)]
    present = [iou for iou in ious if iou is not None]
    if not present:
        raise ValueError("mean_iou: the confusion matrix is empty (no pixel was evaluated).")
    return sum(present) / len(present), ious


def average_precision(true_positive: Sequence[bool], num_truth: int) -> float:
    """VOC all-point interpolated AP of detections already ranked by score (True: a true positive), for a class
    with `num_truth` true boxes: the area under the precision envelope (precision made non-increasing in
    recall) over recall."""
    hits = torch.tensor(list(true_positive), dtype=torch.float64)
    cumulative = hits.cumsum(0)
    recall = cumulative / num_truth
    precision = cumulative / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    recall = torch.cat([torch.zeros(1, dtype=torch.float64), recall, torch.ones(1, dtype=torch.float64)])
    precision = torch.cat([torch.zeros(1, dtype=torch.float64), precision, torch.zeros(1, dtype=torch.float64)])
    precision = precision.flip(0).cummax(0).values.flip(0)  # the envelope: best precision at this recall or more
    steps = recall[1:] != recall[:-1]
    return float(((recall[1:] - recall[:-1]) * precision[1:])[steps].sum())


Detections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # scores (n,), classes (n,), corner boxes (n, 4)
Truth = tuple[torch.Tensor, torch.Tensor]  # classes (m,), corner boxes (m, 4)


def mean_average_precision(
    detections: Sequence[Detections], truths: Sequence[Truth], iou_threshold: float = IOU_THRESHOLD
) -> tuple[float, dict[int, float]]:
    """mAP over the classes present in `truths` (one entry per image in both sequences), and each class's AP."""
    if len(detections) != len(truths):
        raise ValueError(f"mean_average_precision: {len(detections)} images of detections, {len(truths)} of truth.")
    classes = sorted({int(c) for truth_classes, _ in truths for c in truth_classes})
    if not classes:
        raise ValueError("mean_average_precision: the ground truth holds no box.")
    per_class: dict[int, float] = {}
    for cls in classes:
        truth_boxes = [boxes[truth_classes == cls] for truth_classes, boxes in truths]
        ranked = sorted(
            ((float(score), image, box) for image, (scores, det_classes, boxes) in enumerate(detections)
             for score, det_class, box in zip(scores, det_classes, boxes) if int(det_class) == cls),
            key=lambda item: -item[0],  # sorted() is stable: equal scores keep image order
        )
        matched = [torch.zeros(len(boxes), dtype=torch.bool) for boxes in truth_boxes]
        hits = []
        for _, image, box in ranked:
            candidates = truth_boxes[image]
            if len(candidates) == 0:
                hits.append(False)
                continue
            overlaps = box_iou(box[None], candidates)[0]
            best = int(overlaps.argmax())
            hit = bool(overlaps[best] > iou_threshold) and not bool(matched[image][best])
            if hit:
                matched[image][best] = True
            hits.append(hit)
        per_class[cls] = average_precision(hits, sum(len(boxes) for boxes in truth_boxes))
    return sum(per_class.values()) / len(per_class), per_class


__all__ = [
    "IOU_THRESHOLD", "average_precision", "box_iou", "confusion_matrix", "mean_average_precision", "mean_iou",
]
