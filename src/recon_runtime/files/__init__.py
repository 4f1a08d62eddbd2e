"""Files in and out: audio (read, write, atomic), the encoded-latents format, metrics and the log-mel plot.

Used from above (the CLI, the server, the dataset jobs); nothing here loads a model. matplotlib
(the `plot` extra) is imported only when `plot.plot_mels` runs.
"""
