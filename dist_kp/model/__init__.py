"""The model: torchvision's Keypoint R-CNN built from the `model` config section, its weights
(full, partial, torchvision's files), the inference weights file's payload, a trained model
rebuilt from its weights file or checkpoint (trained), precision (autocast, grad scaler) and the EMA of
the weights (ema)."""
