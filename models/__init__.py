"""RetinaFace models. Kept free of heavy imports so config.py can read the choices cheaply."""

NETWORKS = ("mobilenet0.25", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
