"""The PyTorch twins of cnn.models (optional: torch is imported inside).

Same layers, same order, same ``state_dict`` keys as ``cnn.models.build(name)``,
so weights move between the two frameworks. Used by the throughput benchmark
(bench/cnn_throughput.py), PyTorch DDP's step (bench/peers/ddp.py) and the
parity tests (tests/test_torch_parity.py).
"""

# name -> (input shape, default classes), as cnn.models.MODELS. Repeated here so
# that the PyTorch process never imports cnn (numba would inflate its memory).
MODELS = {
    "digits": ((1, 8, 8), 10),
    "lenet": ((1, 28, 28), 10),
    "lenet-cifar": ((3, 32, 32), 10),
    "resnet20": ((3, 32, 32), 10),
    "vgg16-cifar": ((3, 32, 32), 10),
    "vgga": ((3, 224, 224), 1000),
    "vgg16": ((3, 224, 224), 1000),
    "resnet50": ((3, 224, 224), 1000),
}

VGG_CONFIGS = {  # as cnn.models.vgg.CONFIGS
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def build_torch_model(name, num_classes=None):
    """The PyTorch twin of ``cnn.models.build(name)`` (same layers, same state_dict keys)."""
    from collections import OrderedDict

    import torch
    from torch import nn

    def conv_bn(in_channels, out_channels, stride):
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                             nn.BatchNorm2d(out_channels))

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, in_channels, channels, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)
            self.relu = nn.ReLU(inplace=True)
            needs_projection = stride != 1 or in_channels != channels
            self.downsample = conv_bn(in_channels, channels, stride) if needs_projection else None

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, in_channels, width, stride=1):
            super().__init__()
            out_channels = width * 4
            self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out_channels)
            self.relu = nn.ReLU(inplace=True)
            needs_projection = stride != 1 or in_channels != out_channels
            self.downsample = conv_bn(in_channels, out_channels, stride) if needs_projection else None

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    def stage(block, in_channels, channels, blocks, stride):
        layers = [block(in_channels, channels, stride)]
        layers += [block(channels * block.expansion, channels) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    class ResNet(nn.Module):
        def __init__(self, stem, stages, features, num_classes):
            super().__init__()
            for key, module in stem:
                self.add_module(key, module)
            for index, module in enumerate(stages, start=1):
                self.add_module(f"layer{index}", module)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(features, num_classes)

        def forward(self, x):
            for module in self.children():
                if module is self.fc:
                    x = torch.flatten(x, 1)
                x = module(x)
            return x

    def vgg_features(config):
        layers, in_channels = [], 3
        for entry in config:
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, entry, 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = entry
        return layers

    class VGG(nn.Module):
        def __init__(self, config, classifier, pool):
            super().__init__()
            self.features = nn.Sequential(*vgg_features(config))
            if pool:
                self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(*classifier)

        def forward(self, x):
            x = self.features(x)
            if hasattr(self, "avgpool"):
                x = self.avgpool(x)
            return self.classifier(torch.flatten(x, 1))

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    classes = MODELS[name][1] if num_classes is None else int(num_classes)

    if name == "digits":
        return nn.Sequential(OrderedDict({
            "conv1": nn.Conv2d(1, 16, 3, padding=1), "relu1": nn.ReLU(), "pool1": nn.MaxPool2d(2),
            "conv2": nn.Conv2d(16, 32, 3, padding=1), "relu2": nn.ReLU(), "flatten": nn.Flatten(),
            "fc": nn.Linear(512, classes)}))
    if name in ("lenet", "lenet-cifar"):
        first = nn.Conv2d(1, 6, 5, padding=2) if name == "lenet" else nn.Conv2d(3, 6, 5)
        return nn.Sequential(OrderedDict({
            "conv1": first, "relu1": nn.ReLU(), "pool1": nn.MaxPool2d(2),
            "conv2": nn.Conv2d(6, 16, 5), "relu2": nn.ReLU(), "pool2": nn.MaxPool2d(2),
            "flatten": nn.Flatten(), "fc1": nn.Linear(400, 120), "relu3": nn.ReLU(),
            "fc2": nn.Linear(120, 84), "relu4": nn.ReLU(), "fc3": nn.Linear(84, classes)}))
    if name == "resnet20":
        stem = [("conv1", nn.Conv2d(3, 16, 3, padding=1, bias=False)),
                ("bn1", nn.BatchNorm2d(16)), ("relu", nn.ReLU(inplace=True))]
        stages = [stage(BasicBlock, 16, 16, 3, 1), stage(BasicBlock, 16, 32, 3, 2),
                  stage(BasicBlock, 32, 64, 3, 2)]
        return ResNet(stem, stages, 64, classes)
    if name == "resnet50":
        stem = [("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)),
                ("bn1", nn.BatchNorm2d(64)), ("relu", nn.ReLU(inplace=True)),
                ("maxpool", nn.MaxPool2d(3, stride=2, padding=1))]
        stages = [stage(Bottleneck, 64, 64, 3, 1), stage(Bottleneck, 256, 128, 4, 2),
                  stage(Bottleneck, 512, 256, 6, 2), stage(Bottleneck, 1024, 512, 3, 2)]
        return ResNet(stem, stages, 2048, classes)
    if name == "vgg16-cifar":
        head = [nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, classes)]
        return VGG(VGG_CONFIGS["D"], head, pool=False)
    head = [nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, classes)]
    return VGG(VGG_CONFIGS["D" if name == "vgg16" else "A"], head, pool=True)
