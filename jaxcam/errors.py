"""jaxcam's own errors: what is wrong with the user's input or run, said in one sentence.

train.py and explain.py print a JaxcamError as `error: <sentence>` and exit with status 1; any
other exception is a bug and keeps its traceback.
"""


class JaxcamError(Exception):
    """Bad input or a failed run; the message is one sentence that says what is wrong."""


class ConfigError(JaxcamError, ValueError):
    """A config, a command-line argument or a run directory is invalid."""


class DataError(JaxcamError, ValueError):
    """A dataset is missing or malformed, or is not the one a run was trained on."""


class CheckpointError(JaxcamError, RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the model."""


class WriteError(JaxcamError, OSError):
    """A file could not be written: a full disk, an unwritable folder."""


class TrainingDiverged(JaxcamError, RuntimeError):
    """The training loss, or the model's outputs on the test images, became NaN or infinite."""
