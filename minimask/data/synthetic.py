"""The synthetic data sets minimask draws itself, by name: one table, next to the generators.

``minimask train --config NAME`` with no data flags trains on the set of the same name (the
``shapes`` preset on ``shapes``, ``figures`` on ``figures``), drawn once into ``data/NAME/``.
A preset knows no data set; this table is where a name finds its generator.
"""

import inspect
import os

from .figures import make_figures
from .shapes import make_shapes

GENERATORS = {"shapes": make_shapes, "figures": make_figures}


def default_train_count(name):
    """How many training images ``GENERATORS[name]`` draws by default (its own ``train=``)."""
    train = inspect.signature(GENERATORS[name]).parameters.get("train")
    return None if train is None else train.default


def ensure_synthetic(name, folder, log=print):
    """``folder/train.json`` and ``val.json`` of the synthetic set ``name``, drawn with the
    generator's defaults the first time.  Returns the two paths."""
    if name not in GENERATORS:
        raise ValueError(f"no synthetic data set {name!r}: the ones minimask draws are {sorted(GENERATORS)}")
    train_json, val_json = os.path.join(folder, "train.json"), os.path.join(folder, "val.json")
    if not (os.path.isfile(train_json) and os.path.isfile(val_json)):
        log(f"no data given: generating the synthetic {name} data set in {folder}/ (once)")
        GENERATORS[name](folder)
    return train_json, val_json


__all__ = ["GENERATORS", "default_train_count", "ensure_synthetic"]
