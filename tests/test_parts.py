"""Models that cannot be traced whole (detectors): pruned part by part, checked whole."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from micro_models import randomize
from torch import nn

import fxprune


class Detectorish(nn.Module):
    """A list of images in, a data-dependent filter out: neither fx nor torch.export traces
    it whole; its backbone and head trace by themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 4, 1))

    def forward(self, images: list[torch.Tensor]):
        x = torch.stack([img for img in images])
        scores = self.head(self.backbone(x))
        if bool((scores > 0).any()):  # data-dependent control flow, as box decoding has
            scores = scores * (scores > 0)
        return scores


def _images():
    torch.manual_seed(0)
    return ([torch.randn(3, 16, 16), torch.randn(3, 16, 16)],)


def test_an_untraceable_model_is_pruned_by_parts_and_checked_whole():
    model = randomize(Detectorish())
    before = copy.deepcopy(model.state_dict())
    res = fxprune.prune(model, _images(), ratio=0.5, round_to=8)
    assert res.trace_options["parts"] == ["backbone", "head"]
    assert res.report.verified == "outputs equal the masked original"
    assert len(res.kept["backbone.0.weight"][0]) == 8
    assert len(res.kept["head.0.weight"][0]) == 16  # inside the head: pruned
    assert "head.2.weight" not in res.kept or 0 not in res.kept["head.2.weight"]  # outputs kept
    assert "backbone.3.weight" not in res.kept or 0 not in res.kept["backbone.3.weight"]
    assert res.report.macs_after < 0.6 * res.report.macs_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = res.module(*_images())
    assert out.shape == (2, 4, 16, 16)
    fxprune.verify(model, res, _images())  # the public oracle agrees


def test_the_whole_model_oracle_catches_a_wrong_part():
    model = randomize(Detectorish())
    res = fxprune.prune(model, _images(), ratio=0.5)
    with torch.no_grad():
        res.module.head.get_parameter("0.weight")[0, 0] += 1.0
    with pytest.raises(fxprune.VerificationError, match=r"head\.0\.weight"):
        fxprune.verify(model, res, _images())


def test_options_that_rank_the_whole_model_are_refused_by_parts():
    with pytest.raises(fxprune.PruneError, match=r"part by part.*target_macs"):
        fxprune.prune(Detectorish(), _images(), target_macs=0.5)


def test_a_torchvision_detector_prunes_its_backbone_and_heads():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5
    ).eval()
    images = ([torch.rand(3, 160, 160)],)
    res = fxprune.prune(model, images, ratio=0.5, round_to=8)
    assert "backbone" in res.trace_options["parts"]
    assert res.report.verified == "outputs equal the masked original"
    assert res.report.macs_ratio > 1.5
    with torch.no_grad():
        dets = res.module(*images)
    assert set(dets[0]) == {"boxes", "scores", "labels"}


def test_a_result_pruned_by_parts_is_not_saved_as_a_plan(tmp_path):
    res = fxprune.prune(randomize(Detectorish()), _images(), ratio=0.5)
    with pytest.raises(fxprune.FxpruneError, match="part by part"):
        fxprune.save(res, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_count_macs_counts_an_untraceable_model_on_a_real_forward():
    model = randomize(Detectorish())
    macs = fxprune.count_macs(model, _images())
    conv = 16 * 16 * 2 * (3 * 16 * 9 + 16 * 32 * 9 + 32 * 32 * 9 + 32 * 4)  # 2 images, 16x16
    assert macs == conv


def test_pad_outputs_prunes_the_features_a_part_hands_on_and_keeps_the_ignored_head():
    """With pad_outputs the backbone's output (read by the head part) is pruned and padded
    back; the head's prediction layer is ignored, and a part whose only groups are smaller
    than round_to stays as it is instead of failing the whole prune."""
    model = randomize(Detectorish())
    kept = fxprune.prune(model, _images(), ratio=0.5, round_to=8)
    res = fxprune.prune(
        model, _images(), ratio=0.5, round_to=8, pad_outputs=True, ignore=[model.head[2]]
    )
    assert len(res.kept["backbone.3.weight"][0]) == 16  # the features the head reads
    assert "head.2.weight" not in res.kept or 0 not in res.kept["head.2.weight"]
    assert res.report.macs_after < kept.report.macs_after
    assert res.report.verified == "outputs equal the masked original"
    assert res.module(*_images()).shape == (2, 4, 16, 16)
    model.head = nn.Conv2d(32, 4, 1)  # a part whose one group (4 channels) is < round_to
    tiny = fxprune.prune(model, _images(), ratio=0.5, round_to=8, pad_outputs=True)
    assert tiny.trace_options["parts"] == ["backbone"]  # the head stays as it is
    assert "head.weight" not in tiny.kept and len(tiny.kept["backbone.3.weight"][0]) == 16
    assert tiny.report.verified == "outputs equal the masked original"


def test_a_torchvision_detector_with_pad_outputs_prunes_its_fpn_and_keeps_its_predictions():
    """The FPN levels the RPN and ROI heads read are pruned and padded back; the prediction
    layers are ignored, so the detections keep their meaning; the oracle compares them."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5, box_score_thresh=0.0
    ).eval()
    images = ([torch.rand(3, 160, 160)],)
    heads = [model.rpn.head.cls_logits, model.rpn.head.bbox_pred, model.roi_heads.box_predictor]
    kept = fxprune.prune(model, images, ratio=0.5, round_to=8, ignore=heads)
    res = fxprune.prune(model, images, ratio=0.5, round_to=8, ignore=heads, pad_outputs=True)
    assert res.report.verified == "outputs equal the masked original"
    assert len(res.kept["backbone.fpn.layer_blocks.0.0.weight"][0]) == 128  # 256 -> 128
    for name in ("rpn.head.cls_logits.weight", "roi_heads.box_predictor.cls_score.weight"):
        assert 0 not in res.kept.get(name, {})  # predictions keep their channels
    assert res.report.macs_after < kept.report.macs_after
    with torch.no_grad():
        want, got = model(*images)[0], res.module(*images)[0]
    assert len(got["boxes"]) > 0 and got["boxes"].shape[1] == 4
    assert set(got) == set(want)
