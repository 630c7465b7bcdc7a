"""The registered architectures: the five seed papers' networks and CPU-friendly defaults.

Seeds (see ``../shared/seeds``): 000 Issa et al. (EfficientNet-B3 image branch of the
clinical-fusion model), 001 Najjar et al. (MSEENet, EfficientNetV2-B0 + Inception module),
002 Vinurajan et al. (OADLS-ALDC, EfficientNetV2-M + attention CRNN), 003 Pushpalatha et
al. (ResNet50/EfficientNet-B3/VGG16/AlexNet with a max-pool dense head, Adamax), 004
AL-Badareen et al. (SqueezeNet/InceptionV3/ResNet50 with an average-pool dense head).
"""

from __future__ import annotations

from leuko.nets.backbones import BackboneSpec
from leuko.nets.heads import (ACRNNHead, AvgPoolDenseHead, InceptionHead, LinearHead,
                              MaxPoolDenseHead, MelbaImageHead)
from leuko.nets.registry import TF_LITE_MEAN, TF_LITE_STD, Recipe, register_arch

SEED000_ADAM = Recipe(optimizer="adam", lr=1e-4, eps=1e-7, weight_decay=1e-5)
SEED003_ADAMAX = Recipe(optimizer="adamax", lr=1e-3, weight_decay=0.0)
CPU_ADAMW = Recipe(optimizer="adamw", lr=1e-3, weight_decay=1e-2)

register_arch("melba_image", backbone=BackboneSpec("timm", "efficientnet_b3"), input_size=300,
              target_layer="backbone", source="seed 000 (image branch)", recipe=SEED000_ADAM,
              heavy=True)(MelbaImageHead)

register_arch("mseenet", backbone=BackboneSpec("timm", "tf_efficientnetv2_b0"), input_size=224,
              target_layer="head.inception", source="seed 001",
              recipe=Recipe(optimizer="adam", lr=1e-3, weight_decay=0.0, freeze_epochs=5))(InceptionHead)

register_arch("oadls_acrnn", backbone=BackboneSpec("timm", "tf_efficientnetv2_m"), input_size=224,
              target_layer="head.conv", source="seed 002",
              recipe=Recipe(optimizer="rmsprop", lr=1e-4, weight_decay=0.0, freeze_epochs=3),
              preprocessing={"wiener": True, "equalization": "dhe"}, heavy=True)(ACRNNHead)

for _name, _backbone, _library in (("resnet50", "resnet50", "timm"),
                                   ("efficientnet_b3", "efficientnet_b3", "timm"),
                                   ("vgg16", "vgg16", "torchvision"),
                                   ("alexnet", "alexnet", "torchvision")):
    register_arch(f"seed003_{_name}", backbone=BackboneSpec(_library, _backbone), input_size=224,
                  target_layer="backbone", source="seed 003", recipe=SEED003_ADAMAX,
                  heavy=_name != "alexnet")(MaxPoolDenseHead)

for _name, _backbone, _library, _size in (("squeezenet", "squeezenet1_1", "torchvision", 224),
                                          ("inception_v3", "inception_v3", "timm", 299),
                                          ("resnet50", "resnet50", "timm", 224)):
    register_arch(f"seed004_{_name}", backbone=BackboneSpec(_library, _backbone), input_size=_size,
                  target_layer="backbone", source="seed 004",
                  recipe=Recipe(optimizer="adam", lr=1e-4, weight_decay=0.0),
                  heavy=_name != "squeezenet")(AvgPoolDenseHead)

for _name, _size in (("lite0", 224), ("lite2", 260)):
    register_arch(f"efficientnet_{_name}", backbone=BackboneSpec("timm", f"tf_efficientnet_{_name}"),
                  input_size=_size, target_layer="backbone", source="CPU default (offline ImageNet)",
                  mean=TF_LITE_MEAN, std=TF_LITE_STD, interpolation="bicubic",
                  recipe=CPU_ADAMW)(LinearHead)

register_arch("melba_fusion", backbone=BackboneSpec("timm", "efficientnet_b3"), input_size=300,
              target_layer="backbone", source="seed 000 (image + clinical fusion)", recipe=SEED000_ADAM,
              heavy=True, fusion=True)(MelbaImageHead)

register_arch("fusion_lite0", backbone=BackboneSpec("timm", "tf_efficientnet_lite0"), input_size=224,
              target_layer="backbone", source="seed 000 fusion on the CPU default backbone",
              mean=TF_LITE_MEAN, std=TF_LITE_STD, interpolation="bicubic", recipe=SEED000_ADAM,
              fusion=True)(MelbaImageHead)
