"""The project's shared exceptions and exit codes: a leaf module (imports nothing of the project), so
that inference, the export and the trainer can all raise and catch them without importing each other.

    ConfigError     a flag value or database that cannot be used; the message says which and why
    TrainingError   training stopped on an error (non-finite loss, unusable checkpoint)
    InferenceError  an inference run cannot start (model, flags, folders)
    ImageError      one image cannot be segmented; the run goes on with the others
"""

EXIT_OK, EXIT_ERROR, EXIT_BAD_FLAGS, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143


class ConfigError(ValueError):
    """A flag value or database that cannot be trained on; the message says which and why."""


class TrainingError(RuntimeError):
    """Training stopped on an error (non-finite loss, unusable checkpoint)."""


class InferenceError(Exception):
    """The run cannot start: missing or unreadable model, bad configuration or flags."""


class ImageError(Exception):
    """One image cannot be segmented (unreadable, wrong shape or channel count); others go on."""
