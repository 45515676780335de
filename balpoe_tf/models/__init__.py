"""BalPoE networks: a shared trunk and M expert heads with cosine classifiers (their training
task is `balpoe_tf.task`). Modules, each importing only those above it:

- `layers`: fused batch norm (folded into the convolution at inference), the cosine
  classifier, the option-A shortcut, the block stack, PyTorch-matching initialisers and
  convolutions;
- `cifar_resnet`, `imagenet_resnet`: the two backbone families (trunk and expert layers);
- `balpoe`: the backbone registry, `BalPoENetwork`, the forward pass over a dataset, and the
  precision policy networks are made in.
"""

from balpoe_tf.models.layers import (batch_norm, BlockStack, conv_batch_norm, conv_layers, CosineClassifier,
                                     FusedBatchNormalization, kaiming_normal, PadShortcut, strided_shape, subsample,
                                     UnitColumnUniform)
from balpoe_tf.models.cifar_resnet import (BasicBlock, cifar_resnet, CifarResNetExpert, CifarResNetTrunk, conv3x3,
                                           ResNetStage)
from balpoe_tf.models.imagenet_resnet import (Bottleneck, BottleneckStage, imagenet_resnet, ImageNetResNetExpert,
                                              ImageNetResNetTrunk)
from balpoe_tf.models.balpoe import (BACKBONES, BalPoENetwork, count_params, forward_function, precision_policy,
                                     predict_dataset)

__all__ = ["batch_norm", "BlockStack", "conv_batch_norm", "conv_layers", "CosineClassifier", "FusedBatchNormalization",
           "kaiming_normal", "PadShortcut", "strided_shape", "subsample", "UnitColumnUniform", "BasicBlock",
           "cifar_resnet", "CifarResNetExpert", "CifarResNetTrunk", "conv3x3", "ResNetStage", "Bottleneck",
           "BottleneckStage", "imagenet_resnet", "ImageNetResNetExpert", "ImageNetResNetTrunk", "BACKBONES",
           "BalPoENetwork", "count_params", "forward_function", "precision_policy", "predict_dataset"]
