from .datasets import (DATASETS, ImageDataset, load_cifar10, load_dataset, load_digits, load_image_folder,
                       load_mnist, read_idx, resize_uint8, to_model_range, to_uint8)

__all__ = ["DATASETS", "ImageDataset", "load_cifar10", "load_dataset", "load_digits", "load_image_folder",
           "load_mnist", "read_idx", "resize_uint8", "to_model_range", "to_uint8"]
