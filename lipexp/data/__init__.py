"""Image data: array loaders (`sources`), batched on-device augmentation (`augment`) and
the Lightning data module that ties them together (`datamodule`)."""
