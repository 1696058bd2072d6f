"""Train the Keras digits sample: a small channels-last CNN on scikit-learn's bundled 8x8 digits (no download).

    pip install "keras>=3" h5py scikit-learn      # with torch already installed (Keras runs on it)
    python sample_models/train_keras_digits.py

Writes ``sample_models/digits_keras.keras`` (Keras 3's zip) and ``sample_models/digits_keras.h5``
(the legacy HDF5 full-model file) holding the same model, and prints the test accuracy. The data split
is ``train_digits.load_data()``'s, transposed to NHWC. Seeded and single-threaded; another CPU may
round differently, so a rerun gives close but not byte-identical weights.

    8x8x1 -> Conv2D(16, 3) -> 6x6x16 -> Conv2D(32, 3) -> 4x4x32 -> Flatten -> Dense(64) -> Dense(10)

Keras flattens the 4x4x32 map (H, W, C): fc2conv reads that order from the file's config and
converts ``fc1`` into a 4x4 convolution over 32 channels with the ``hwc`` permutation.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_digits import load_data, reproducible  # noqa: E402

STEM = "digits_keras"


def build_model():  # noqa: ANN201 - keras is imported lazily
    """The untrained Keras model (named layers, so the files and the README can refer to them)."""
    import keras

    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1), name="digit"),
            layers.Conv2D(16, 3, activation="relu", name="conv1"),
            layers.Conv2D(32, 3, activation="relu", name="conv2"),
            layers.Flatten(name="flatten"),
            layers.Dense(64, activation="relu", name="fc1"),
            layers.Dense(10, name="fc2"),
        ],
        name="digits_keras",
    )


def train(epochs: int = 30):  # noqa: ANN201
    """Train it; returns (model, test accuracy, NHWC test images, test labels)."""
    import keras
    import numpy as np

    with reproducible():
        keras.utils.set_random_seed(0)
        x_train, y_train, x_test, y_test = (t.numpy() for t in load_data())
        x_train, x_test = x_train.transpose(0, 2, 3, 1), x_test.transpose(0, 2, 3, 1)  # NCHW -> NHWC
        model = build_model()
        model.compile(
            optimizer=keras.optimizers.Adam(2e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0, shuffle=True)
        scores = model.predict(x_test, verbose=0)
        accuracy = float(np.mean(scores.argmax(axis=1) == y_test))
        # An uncompiled copy: the files hold the model, not the optimizer's state.
        clean = build_model()
        clean.set_weights(model.get_weights())
    return clean, accuracy, x_test, y_test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    model, accuracy, _, y_test = train(args.epochs)
    for suffix in (".keras", ".h5"):
        model.save(args.out / f"{STEM}{suffix}")
    print(f"test accuracy {accuracy:.4f} on {len(y_test)} held-out digits; wrote {args.out / STEM}.keras and .h5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
