"""User-facing errors: every problem the user can fix is raised as a DeployError naming it."""


class DeployError(Exception):
    """A problem with the user's input (files, configs, options) that the CLI reports without a traceback."""


class UnsupportedModelError(DeployError):
    """The checkpoint's architecture or config uses a feature this project does not implement."""


class CheckpointError(DeployError):
    """A checkpoint's files are missing, corrupt, or do not match its config."""


class ValidationError(DeployError):
    """An exported graph disagrees with the PyTorch reference beyond the stated tolerance."""
