"""The network: build_model returns any nn.Module mapping images (batch, in_channels, image_size, image_size)
to logits (batch, num_classes). `cfg` is config.yaml's model section (cfg.width, cfg.dropout, ...);
model.pretrained and model.freeze still apply to what it returns."""
from torch import nn


class Net(nn.Module):
    """Two conv blocks, global average pooling, a linear head."""

    def __init__(self, num_classes: int, in_channels: int, width: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def build_model(cfg, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return Net(num_classes, in_channels, cfg.width)
