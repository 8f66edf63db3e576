"""Classifiers of the study (docs/method.md, "Models") and the tanh logit layer.

Modules: ``small_cnn`` (digits / MNIST), ``allcnn`` (AllCNN-C), ``resnet`` (the CIFAR
ResNet-34 and ResNeXt-34), ``torchvision_resnet`` (the wider ImageNet-style ResNet-18/34,
an extra) and ``heads`` (``TanhHead``). Every model maps images with pixels in [0, 1] of
shape (B, C, H, W) to logits of shape (B, num_classes).
"""
