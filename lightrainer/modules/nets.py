"""Small ready networks a YAML file can name."""

from __future__ import annotations

from torch import Tensor, nn

from lightrainer.modules.blocks import Conv


class SmallCNN(nn.Module):
    """A 5-conv classifier (widths w, w, 2w, 2w, 4w) for small images, 8x8 and up.

    Conv-BN-SiLU blocks, 2x2 max-pooling (ceil mode) after the 2nd and 4th conv, global average
    pooling, dropout, a linear head: the same net serves 28x28 MNIST and 8x8 digits.

    Args:
        num_classes: output logits.
        in_channels: input image channels.
        width: channels of the first conv.
        dropout: dropout before the head.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        # Kept so that a run's record can rebuild the network from its weights file alone.
        self.num_classes, self.in_channels, self.width = num_classes, in_channels, width
        w = width
        self.features = nn.Sequential(
            Conv(in_channels, w, 3),
            Conv(w, w, 3),
            nn.MaxPool2d(2, ceil_mode=True),
            Conv(w, 2 * w, 3),
            Conv(2 * w, 2 * w, 3),
            nn.MaxPool2d(2, ceil_mode=True),
            Conv(2 * w, 4 * w, 3),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(x))
