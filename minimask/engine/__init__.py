"""Training, evaluation and prediction around a model (the paper's Sec. 3.1 and Sec. 4).

- ``trainer``: ``train(cfg, train_ann, ...)``, the SGD loop with logging, checkpoints, resume;
- ``evaluator``: ``evaluate(model, dataset)``, COCO results files and COCOeval's numbers;
- ``predictor``: ``Predictor`` and ``predict_files``, detections drawn on image files;
- ``checkpoint``: one ``.npz`` per checkpoint, written atomically, loadable on either device.

The engine does not care which model it runs: anything with ``model(images, targets) ->
dict of loss Tensors`` in training mode and ``model.predict(images)`` in eval mode.
"""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .evaluator import evaluate
from .predictor import Predictor, predict_files
from .trainer import train

__all__ = ["train", "evaluate", "Predictor", "predict_files", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint"]
