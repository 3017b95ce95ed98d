"""The trainer: fine-tune a LoRA on a folder of images (`sdlora train`, or `train(TrainConfig(...))`).

from sdlora.train import TrainConfig, train
path = train(TrainConfig(data_dir="samples/style", output="runs/style", steps=300))
"""

from sdlora.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "train"]


def __getattr__(name: str):
    # `train` pulls in torch, diffusers and accelerate: import it on first use, so that
    # `sdlora --help` and config checks stay fast.
    if name == "train":
        from sdlora.train.loop import train

        return train
    raise AttributeError(name)
