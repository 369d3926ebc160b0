"""Model registry: ``create_model(name, num_classes=10, in_channels=3, **kw)``, ``list_models()``,
``@register_model("name")``; any torchvision classification model as ``"tv:<name>"`` (weights=None).

Paper architectures (all post-activation conv(bias=False) -> BN -> ReLU, traceable by ``torch.fx``):
vgg19_bn_cifar, resnet164_cifar, densenet_bc_100_40 (CIFAR, paper §4.4); vgg19_simplified_imagenet
(§4.2); vgg16_bn_imagenet, densenet121, resnet18/34/50/101 (§4.3); mobilenet_v1_025/050 (Table 3); and
vgg_small for quick CPU runs.
"""

from .registry import TV_PREFIX, create_model, list_models, register_model, replace_first_conv, tv_classification_models
from . import densenet, mobilenet, resnet, vgg

_ARCHITECTURE_MODULES = (densenet, mobilenet, resnet, vgg)  # importing them registers the architectures

__all__ = ["create_model", "list_models", "register_model", "replace_first_conv", "tv_classification_models",
           "TV_PREFIX"]
