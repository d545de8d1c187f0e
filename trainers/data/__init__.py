"""Datasets: folders of images and captions, encoded once into latents and conditionings."""
from .dataset import BatchSampler, TrainingData, TrainSample, encode_captions

__all__ = ["BatchSampler", "TrainSample", "TrainingData", "encode_captions"]
