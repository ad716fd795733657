"""torchvision Mask R-CNN architectures: the sizes live here and nowhere else.

``small``
    The CPU configuration: a ResNet-18 layout at half width (32-64-128-256 channels, BatchNorm,
    trained from scratch), a 64-channel FPN on strides 8/16/32 (+ max-pool level), anchors
    16-128 px, a 256-d box head, a two-layer 64-channel mask head, 200/100 RPN proposals and 64
    sampled RoIs/anchors per image, one RoIAlign sample per bin (torchvision's CPU RoIAlign
    backward dominates the step otherwise; at stride 8 a 7 x 7 grid already over-samples the
    RoIs of 128 px images), images used at ``image_size`` (no resizing at 128 px).
``resnet50_fpn``
    torchvision's ``maskrcnn_resnet50_fpn`` (BatchNorm when trained from scratch, as torchvision
    chooses when no weights are given), sized for LVIS: shorter side ``image_size``, 300
    detections per image at score >= 1e-4 as the LVIS protocol evaluates.

No weights are downloaded: start points come from ``init_checkpoint`` in the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.resnet import BasicBlock
from torchvision.ops import MultiScaleRoIAlign

ARCHS = ("small", "resnet50_fpn")
#: The box head's sizes per arch: (its input, C x 7 x 7 RoI features flattened; its
#: representation, the width of fc6 and fc7). The box predictor maps the representation to
#: K + 1 class logits and 4 (K + 1) box deltas. (torchvision's R50-FPN: 256 x 7 x 7 -> 1024.)
BOX_HEAD_SIZES = {"small": (64 * 7 * 7, 256), "resnet50_fpn": (256 * 7 * 7, 1024)}


class ThinResNet(nn.Module):
    """A ResNet of torchvision ``BasicBlock``s with chosen widths (no classifier).

    Child names follow torchvision's ResNet (``conv1 … layer4``) so that
    ``BackboneWithFPN`` can take the layer outputs. Input B x 3 x H x W; ``layerK`` output has
    ``widths[K-1]`` channels at stride ``2 ** (K + 1)``.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256),
                 blocks: Sequence[int] = (2, 2, 2, 2),
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        stem = widths[0]
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = stem
        for k, (width, count) in enumerate(zip(widths, blocks), start=1):
            stride = 1 if k == 1 else 2
            layers = []
            for b in range(count):
                downsample = None
                s = stride if b == 0 else 1
                if s != 1 or in_ch != width:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_ch, width, kernel_size=1, stride=s, bias=False),
                        norm_layer(width),
                    )
                layers.append(BasicBlock(in_ch, width, s, downsample, norm_layer=norm_layer))
                in_ch = width
            setattr(self, f"layer{k}", nn.Sequential(*layers))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):  # pragma: no cover - BackboneWithFPN calls the children directly
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def build_small_maskrcnn(num_classes: int, image_size: int = 128) -> MaskRCNN:
    """The CPU configuration (module docstring); ``num_classes`` excludes background."""
    widths = (32, 64, 128, 256)
    head_in, representation = BOX_HEAD_SIZES["small"]
    channels = head_in // (7 * 7)
    body = ThinResNet(widths)
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=list(widths[1:]),
        out_channels=channels,
    )
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,)),
                              aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    names = ["0", "1", "2"]
    return MaskRCNN(
        backbone,
        num_classes=None,
        min_size=image_size,
        max_size=image_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=64,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=1),
        box_head=TwoMLPHead(head_in, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes + 1),
        box_batch_size_per_image=64,
        box_detections_per_img=50,
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=names, output_size=14, sampling_ratio=1),
        mask_head=MaskRCNNHeads(channels, [channels, channels], 1),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes + 1),
    )


def build_resnet50_fpn_maskrcnn(num_classes: int, image_size: int = 800) -> MaskRCNN:
    """torchvision's R50-FPN Mask R-CNN from scratch, LVIS-sized (module docstring)."""
    return maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes + 1,
        min_size=image_size,
        max_size=int(round(image_size * 1333 / 800)),
        box_detections_per_img=300,
        box_score_thresh=1e-4,
    )


def box_classifier_layers(arch: str, num_classes: int) -> list[tuple[str, int, int]]:
    """``(name, d_in, d_out)`` of the box classifier's linear layers of ``arch`` with
    ``num_classes`` classes (background excluded): fc6, fc7, cls_score, bbox_pred."""
    if arch not in BOX_HEAD_SIZES:
        raise ValueError(f"arch {arch!r} is unknown for the torchvision backend; use one of "
                         f"{ARCHS}")
    head_in, rep = BOX_HEAD_SIZES[arch]
    k = num_classes + 1
    return [("box_head.fc6", head_in, rep), ("box_head.fc7", rep, rep),
            ("box_predictor.cls_score", rep, k), ("box_predictor.bbox_pred", rep, 4 * k)]


def build_maskrcnn(num_classes: int, arch: str = "small", image_size: int = 128) -> MaskRCNN:
    """Stock torchvision Mask R-CNN of ``arch`` (one of :data:`ARCHS`)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (background excluded), got {num_classes}")
    if arch == "small":
        return build_small_maskrcnn(num_classes, image_size)
    if arch == "resnet50_fpn":
        return build_resnet50_fpn_maskrcnn(num_classes, image_size)
    raise ValueError(f"arch {arch!r} is unknown for the torchvision backend; use one of {ARCHS}")
