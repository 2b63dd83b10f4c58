"""anomalyd_train: train autoencoders on normal data, export them as self-describing ONNX models
for the anomalyd daemon (see docs/MODEL-CONTRACT.md).

Modules, one concern each:
    data       load CSV / NDJSON, pick features, group by key, cut windows, split, hash
    kinds      the nine model kinds (PyTorch modules and their training losses)
    train      the training loops (mini-batch, greedy layer-wise, closed-form PCA)
    export     the exported graph (normalisation + model + per-feature error) and ONNX metadata
    calibrate  the summary of held-back validation scores written into the model
    plots      the loss-curve PNG
    generate   sampling synthetic normal data from a trained VAE
    contract   checks that an ONNX file follows the model contract
    synth      synthetic datasets with injected anomalies (tests, examples)
    inject     anomalies injected into held-back normal data, for `select`
    selection  `anomalyd-train select`: kind and code size chosen by detection on the user's data
    cli        the `anomalyd-train` command
"""

__version__ = "0.1.0"

KINDS = ("pca", "dense", "conv", "vae", "sparse", "stacked", "denoising", "lstm", "gru")
SEQUENCE_KINDS = ("conv", "lstm", "gru")
